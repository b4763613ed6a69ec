"""Generate examples/data/tiny_codes.jsonl: programming Q&A in the shape of the
nampdn-ai/tiny-codes dataset (columns programming_language, prompt, response).

Written for slmops. Every answer is correct code for its task and parameter: tasks are
parameterised (a constant k, a function name) and phrased several ways, giving > 4,300
rows so the `train[:4096]` / `train[4096:4224]` slices of Olive's example hold.
Run: python examples/data/make_tiny_codes.py
"""

import json
import random
from pathlib import Path

# task -> (question with {k} and {name}, explanation, {language: code})
TASKS = {
    "multiply": (
        "multiplies an integer by {k}",
        "The function returns its argument times {k}.",
        {
            "Python": "def {name}(x: int) -> int:\n    return x * {k}",
            "JavaScript": "function {name}(x) {{\n  return x * {k};\n}}",
            "Java": "static int {name}(int x) {{\n    return x * {k};\n}}",
            "Go": "func {name}(x int) int {{\n\treturn x * {k}\n}}",
            "Rust": "fn {name}(x: i64) -> i64 {{\n    x * {k}\n}}",
            "C++": "int {name}(int x) {{\n    return x * {k};\n}}",
        },
    ),
    "divisible": (
        "checks whether an integer is divisible by {k}",
        "An integer is divisible by {k} when the remainder of the division by {k} is zero.",
        {
            "Python": "def {name}(x: int) -> bool:\n    return x % {k} == 0",
            "JavaScript": "function {name}(x) {{\n  return x % {k} === 0;\n}}",
            "Java": "static boolean {name}(int x) {{\n    return x % {k} == 0;\n}}",
            "Go": "func {name}(x int) bool {{\n\treturn x%{k} == 0\n}}",
            "Rust": "fn {name}(x: i64) -> bool {{\n    x % {k} == 0\n}}",
            "C++": "bool {name}(int x) {{\n    return x % {k} == 0;\n}}",
        },
    ),
    "add_all": (
        "adds {k} to every element of a list of integers",
        "It builds a new list in which each element is increased by {k}; the input is not changed.",
        {
            "Python": "def {name}(xs: list[int]) -> list[int]:\n    return [x + {k} for x in xs]",
            "JavaScript": "function {name}(xs) {{\n  return xs.map((x) => x + {k});\n}}",
            "Java": "static int[] {name}(int[] xs) {{\n    int[] out = new int[xs.length];\n    for (int i = 0; i < xs.length; i++) out[i] = xs[i] + {k};\n    return out;\n}}",
            "Go": "func {name}(xs []int) []int {{\n\tout := make([]int, len(xs))\n\tfor i, x := range xs {{\n\t\tout[i] = x + {k}\n\t}}\n\treturn out\n}}",
            "Rust": "fn {name}(xs: &[i64]) -> Vec<i64> {{\n    xs.iter().map(|x| x + {k}).collect()\n}}",
            "C++": "std::vector<int> {name}(const std::vector<int>& xs) {{\n    std::vector<int> out;\n    for (int x : xs) out.push_back(x + {k});\n    return out;\n}}",
        },
    ),
    "count_greater": (
        "counts how many numbers in a list are greater than {k}",
        "It walks the list once and counts the elements strictly greater than {k}.",
        {
            "Python": "def {name}(xs: list[int]) -> int:\n    return sum(1 for x in xs if x > {k})",
            "JavaScript": "function {name}(xs) {{\n  return xs.filter((x) => x > {k}).length;\n}}",
            "Java": "static int {name}(int[] xs) {{\n    int n = 0;\n    for (int x : xs) if (x > {k}) n++;\n    return n;\n}}",
            "Go": "func {name}(xs []int) int {{\n\tn := 0\n\tfor _, x := range xs {{\n\t\tif x > {k} {{\n\t\t\tn++\n\t\t}}\n\t}}\n\treturn n\n}}",
            "Rust": "fn {name}(xs: &[i64]) -> usize {{\n    xs.iter().filter(|&&x| x > {k}).count()\n}}",
            "C++": "int {name}(const std::vector<int>& xs) {{\n    int n = 0;\n    for (int x : xs) if (x > {k}) n++;\n    return n;\n}}",
        },
    ),
    "repeat": (
        "returns a string repeated {k} times",
        "The result is the input string concatenated with itself {k} times.",
        {
            "Python": "def {name}(s: str) -> str:\n    return s * {k}",
            "JavaScript": "function {name}(s) {{\n  return s.repeat({k});\n}}",
            "Java": "static String {name}(String s) {{\n    return s.repeat({k});\n}}",
            "Go": "func {name}(s string) string {{\n\treturn strings.Repeat(s, {k})\n}}",
            "Rust": "fn {name}(s: &str) -> String {{\n    s.repeat({k})\n}}",
            "C++": "std::string {name}(const std::string& s) {{\n    std::string out;\n    for (int i = 0; i < {k}; i++) out += s;\n    return out;\n}}",
        },
    ),
    "power": (
        "raises an integer to the power {k}",
        "It multiplies the base by itself {k} times, starting from 1.",
        {
            "Python": "def {name}(x: int) -> int:\n    result = 1\n    for _ in range({k}):\n        result *= x\n    return result",
            "JavaScript": "function {name}(x) {{\n  let result = 1;\n  for (let i = 0; i < {k}; i++) result *= x;\n  return result;\n}}",
            "Java": "static long {name}(long x) {{\n    long result = 1;\n    for (int i = 0; i < {k}; i++) result *= x;\n    return result;\n}}",
            "Go": "func {name}(x int) int {{\n\tresult := 1\n\tfor i := 0; i < {k}; i++ {{\n\t\tresult *= x\n\t}}\n\treturn result\n}}",
            "Rust": "fn {name}(x: i64) -> i64 {{\n    (0..{k}).fold(1, |acc, _| acc * x)\n}}",
            "C++": "long long {name}(long long x) {{\n    long long result = 1;\n    for (int i = 0; i < {k}; i++) result *= x;\n    return result;\n}}",
        },
    ),
    "first_k": (
        "returns the first {k} characters of a string (or the whole string if it is shorter)",
        "Taking a prefix of length at most {k} never reads past the end of the string.",
        {
            "Python": "def {name}(s: str) -> str:\n    return s[:{k}]",
            "JavaScript": "function {name}(s) {{\n  return s.slice(0, {k});\n}}",
            "Java": "static String {name}(String s) {{\n    return s.substring(0, Math.min({k}, s.length()));\n}}",
            "Go": "func {name}(s string) string {{\n\tif len(s) < {k} {{\n\t\treturn s\n\t}}\n\treturn s[:{k}]\n}}",
            "Rust": "fn {name}(s: &str) -> String {{\n    s.chars().take({k}).collect()\n}}",
            "C++": "std::string {name}(const std::string& s) {{\n    return s.substr(0, {k});\n}}",
        },
    ),
    "sum_to": (
        "returns the sum of the integers from 1 to {k}",
        "The loop adds 1 + 2 + ... + {k}, which equals {total}.",
        {
            "Python": "def {name}() -> int:\n    return sum(range(1, {k} + 1))",
            "JavaScript": "function {name}() {{\n  let total = 0;\n  for (let i = 1; i <= {k}; i++) total += i;\n  return total;\n}}",
            "Java": "static int {name}() {{\n    int total = 0;\n    for (int i = 1; i <= {k}; i++) total += i;\n    return total;\n}}",
            "Go": "func {name}() int {{\n\ttotal := 0\n\tfor i := 1; i <= {k}; i++ {{\n\t\ttotal += i\n\t}}\n\treturn total\n}}",
            "Rust": "fn {name}() -> i64 {{\n    (1..={k}).sum()\n}}",
            "C++": "int {name}() {{\n    int total = 0;\n    for (int i = 1; i <= {k}; i++) total += i;\n    return total;\n}}",
        },
    ),
}

NAMES = {"multiply": ["times_{k}", "multiply_by_{k}", "scale{k}"], "divisible": ["divisible_by_{k}", "is_multiple_of_{k}"],
         "add_all": ["add_{k}_to_all", "shift_by_{k}"], "count_greater": ["count_above_{k}", "greater_than_{k}"],
         "repeat": ["repeat_{k}", "repeat_{k}_times"], "power": ["pow_{k}", "to_the_{k}"],
         "first_k": ["first_{k}_chars", "prefix_{k}"], "sum_to": ["sum_to_{k}", "triangle_{k}"]}

QUESTIONS = [
    "Write a {lang} function `{name}` that {task}.",
    "How do I write a function in {lang} that {task}? Call it `{name}`.",
    "Implement `{name}` in {lang}: a function that {task}.",
    "Create a small {lang} snippet with a function named `{name}` which {task}.",
]


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def main() -> None:
    rng = random.Random(7)
    rows = []
    for task, (question, explanation, codes) in TASKS.items():
        for lang, code in codes.items():
            for k in range(2, 100):
                name = rng.choice(NAMES[task]).format(k=k)
                if lang in ("JavaScript", "Java"):
                    name = camel(name)
                if lang == "Go":
                    name = camel(name)
                prompt = rng.choice(QUESTIONS).format(lang=lang, name=name, task=question.format(k=k))
                body = code.format(name=name, k=k)
                fence = {"C++": "cpp", "JavaScript": "javascript"}.get(lang, lang.lower())
                response = f"```{fence}\n{body}\n```\n{explanation.format(k=k, total=k * (k + 1) // 2)}"
                rows.append({"programming_language": lang, "prompt": prompt, "response": response})
    rng.shuffle(rows)
    out = Path(__file__).with_name("tiny_codes.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
