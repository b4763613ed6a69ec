#!/usr/bin/env bash
# The system packages the tests use, installed where they are missing and this machine can
# (Debian/Ubuntu apt-get, as root or with password-less sudo); elsewhere it says what is missing
# and the tests that need it skip with that reason.
#   gcc + libc6-dev   the fused CPU training kernels (src/slmops/train/cpu/kernels.c) are compiled on first use
#   postgresql        `slmops tune` workers sharing one study: the tests start their own server
#   curl              the README's serve example (run by tests/test_readme.py) waits for the server with it
set -uo pipefail

missing=()
if ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1; then
  missing+=(gcc libc6-dev)
fi
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  missing+=(postgresql)
fi
if ! command -v curl >/dev/null 2>&1; then
  missing+=(curl ca-certificates)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

if command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi
  if [ "$SUDO" != none ]; then
    echo "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # policy-rc.d: a package's own service is not started (the tests start their own PostgreSQL)
    if [ ! -e /usr/sbin/policy-rc.d ] && [ -z "$SUDO" ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null && exit 0
    echo "warning: apt-get could not install: ${missing[*]}" >&2
    exit 0
  fi
fi
echo "note: not installed here (no apt-get, or no root/sudo): ${missing[*]}; the tests that need them skip and say why" >&2
exit 0
