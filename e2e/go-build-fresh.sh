# Sourced by the e2e Go build scripts: `fresh OUT...` succeeds when every
# OUT exists and no file of the calling script's module directory ($here)
# is newer than the oldest of them. A build that is up to date then needs
# no Go build cache at all, so CI can delete that cache (about 5 GB) once
# scripts/setup has built everything (.ci/run).
fresh() {
  local out oldest=""
  for out in "$@"; do
    [ -e "$out" ] || return 1
    if [ -z "$oldest" ] || [ "$out" -ot "$oldest" ]; then
      oldest="$out"
    fi
  done
  [ -z "$(find "$here" -type f -newer "$oldest" -print -quit)" ]
}
