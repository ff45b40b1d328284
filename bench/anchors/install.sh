#!/usr/bin/env bash
# Installs the anchors driftsync's benchmarks compare with, at the versions pinned by the
# package manifests beside this file (and their lockfiles, once made), into DIR (default
# $HOME/.cache/driftsync-anchors): the y-websocket server, Hocuspocus and, with --with-y-sweet,
# y-sweet (built by cargo). Re-running is cheap: installed parts are kept.
#   bench/anchors/install.sh [DIR] [--with-y-sweet]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=$HOME/.cache/driftsync-anchors
with_ysweet=no
for a in "$@"; do
  case $a in
    --with-y-sweet) with_ysweet=yes ;;
    *) dir=$a ;;
  esac
done
for anchor in y-websocket hocuspocus; do
  mkdir -p "$dir/$anchor"
  cp "$here/$anchor/package.json" "$dir/$anchor/package.json"
  [[ -f $here/$anchor/package-lock.json ]] && cp "$here/$anchor/package-lock.json" "$dir/$anchor/"
  if [[ ! -d $dir/$anchor/node_modules ]]; then
    (cd "$dir/$anchor" && if [[ -f package-lock.json ]]; then npm ci --no-audit --no-fund >/dev/null; else npm install --no-audit --no-fund >/dev/null; fi)
  fi
done
if [[ $with_ysweet == yes && ! -x $dir/y-sweet/bin/y-sweet ]]; then
  cargo install y-sweet --version 0.9.1 --locked --root "$dir/y-sweet"
fi
echo "anchors installed in $dir"
