# Sourced by the scripts/ensure-*.sh installers. Tests run in parallel threads and
# processes, and several may ask for the same tool at the same moment (CI once failed on
# two demo tests creating .venv-x402 together): the first takes the lock and installs,
# the others wait for it and then find the stamp.
install_lock() {
  local root="$1" name="$2"
  mkdir -p "$root/.tools"
  exec 9>"$root/.tools/.$name.lock"
  flock 9
}
