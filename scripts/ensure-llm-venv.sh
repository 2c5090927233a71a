#!/usr/bin/env bash
# Prints the python of a local venv (.venv-llm, git-ignored) holding the official Anthropic
# and OpenAI Python SDKs, used as real clients of the metered LLM routes (demo/llm_selftest.py),
# and the h2 library the tests use to send HTTP/2 requests that end with trailers.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv-llm"
source "$root/scripts/lib/install-lock.sh"
install_lock "$root" llm-venv
stamp="$venv/.pag0-installed-v2"
if [[ ! -f "$stamp" ]]; then
  python3 -m venv --clear "$venv" >&2
  "$venv/bin/pip" install --quiet 'anthropic==2.14.0' 'openai==3.57.0' 'h2==4.1.0' >&2
  touch "$stamp"
fi
echo "$venv/bin/python"
