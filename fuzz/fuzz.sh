#!/usr/bin/env bash
# Builds kvshelf's fuzz targets with libFuzzer's coverage instrumentation on stable Rust
# (no nightly toolchain, no cargo-fuzz: the flags below are stable rustc flags; only the
# sanitizers need nightly), and runs them. See fuzz/README.md.
#
#   fuzz/fuzz.sh build                              # every target (release, instrumented)
#   fuzz/fuzz.sh run <target> [seconds] [-- libFuzzer flags…]
#   fuzz/fuzz.sh all [seconds]                      # build, then run every target in turn
#
# Artifacts go to fuzz/target (or $FUZZ_TARGET_DIR): instrumented builds never share a
# target directory with normal ones.
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$PWD/target}"
host=$(rustc -vV | sed -n 's/^host: //p')
targets=(resp_reply frame_put frame_fetch decode)

build() {
  # What cargo-fuzz passes, less -Zsanitizer. `--target` keeps the flags off build
  # scripts and proc macros.
  RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks" \
    cargo build --release --locked --target "$host" --bins
}

run() {
  local t=$1 secs=${2:-60}
  shift $(($# < 2 ? $# : 2))
  [[ ${1:-} == -- ]] && shift
  local dict=frame.dict max_len=4096
  case $t in
    resp_reply) dict=resp.dict ;;
    decode) dict=decode.dict max_len=8192 ;;
  esac
  local dirs=("corpus/$t")
  [[ -d seeds/$t ]] && dirs+=("seeds/$t")
  mkdir -p "corpus/$t" "artifacts/$t"
  "$CARGO_TARGET_DIR/$host/release/$t" "${dirs[@]}" -dict="$dict" -max_len="$max_len" \
    -max_total_time="$secs" -rss_limit_mb=512 -artifact_prefix="artifacts/$t/" \
    -print_final_stats=1 "$@"
}

case ${1:-} in
  build) build ;;
  run) shift; run "$@" ;;
  all)
    build
    for t in "${targets[@]}"; do run "$t" "${2:-60}"; done
    ;;
  *) sed -n '2,12p' fuzz.sh; exit 2 ;;
esac
