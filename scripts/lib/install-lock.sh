# Sourced by the scripts/ensure-*.sh installers. Tests run in parallel threads and
# processes, and several may ask for the same tool at the same moment (CI once failed on
# two demo tests creating .venv-x402 together): the first takes the lock and installs,
# the others wait for it and then find the stamp. Every apt-get runs under the lock
# `apt` (apt-get fails at once, not waits, when another holds dpkg's lock).
#
# install_lock ROOT NAME [FD]: holds .tools/.NAME.lock on file descriptor FD (default 9)
# until the script ends; gives up after 10 minutes. Without flock (not Linux) it goes on
# unlocked.
install_lock() {
  local root="$1" name="$2" fd="${3:-9}"
  command -v flock >/dev/null 2>&1 || return 0
  mkdir -p "$root/.tools"
  eval "exec $fd>\"\$root/.tools/.\$name.lock\""
  if ! flock -w 600 "$fd"; then
    echo "$(basename "$0"): waited 10 minutes for $root/.tools/.$name.lock; giving up" >&2
    exit 1
  fi
}
