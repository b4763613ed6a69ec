"""`slmops run --config`: workflows of passes (fine-tune, merge, export, evaluate), Olive's
file shape accepted and translated (olive.py), one pass contract and registry (passes.py),
planning, caching and the outputs (run.py)."""

from slmops.workflow.run import load_workflow, parse_workflow, plan_workflow, run_workflow

__all__ = ["load_workflow", "parse_workflow", "plan_workflow", "run_workflow"]
