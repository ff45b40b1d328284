#!/usr/bin/env bash
# Runs every cargo-fuzz target for a short while (about 60 s in all, DRIFTSYNC_FUZZ_SECONDS to
# change it), each seeded with every fixture file, and exits non-zero on the first crash. The
# crashing input is then in fuzz/artifacts/<target>/ (git-ignored): add it to fixtures/crashers/
# with a README entry, and fix it.
#
# Needs a nightly toolchain and cargo-fuzz:
#   rustup toolchain install nightly && cargo install cargo-fuzz --locked
# Usage (from anywhere): bash fuzz/run-short.sh
set -euo pipefail
cd "$(dirname "$0")/.."

targets=(native_client_frame native_server_frame yjs_message state_vector update_apply)
total="${DRIFTSYNC_FUZZ_SECONDS:-60}"
per=$(( total / ${#targets[@]} ))
(( per > 0 )) || per=1

# Build first, so the time budget is spent fuzzing.
cargo +nightly fuzz build

# A throwaway corpus per target: libFuzzer adds what it finds to it, never to the repository.
corpus="$(mktemp -d)"
trap 'rm -rf "$corpus"' EXIT
for target in "${targets[@]}"; do
  mkdir -p "$corpus/$target"
  cp fixtures/wire/*.bin fixtures/yjs/*.bin fixtures/crashers/*.bin "$corpus/$target/"
  echo "fuzz: $target for ${per}s"
  cargo +nightly fuzz run "$target" "$corpus/$target" -- \
    -max_total_time="$per" -timeout=10 -rss_limit_mb=2048 -max_len=131072 -print_final_stats=1
done
echo "fuzz: no crash in ${#targets[@]} targets"
