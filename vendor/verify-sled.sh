#!/usr/bin/env bash
# Checks that vendor/sled is sled 0.34.7 as published on crates.io plus vendor/sled.patch,
# nothing else (vendor/README.md says why it is vendored).
set -euo pipefail
cd "$(dirname "$0")"
here="$(pwd)"

expected_sha256=7f96b4737c2ce5987354855aed3797279def4ebf734436c6aa4552cf8e169935
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# cargo's own download cache first (it holds the crate if it was ever fetched), else crates.io.
cached="$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/sled-0.34.7.crate 2>/dev/null | head -n 1 || true)"
if [ -n "$cached" ]; then
  cp "$cached" "$work/sled.crate"
else
  curl -fsSL --retry 3 -o "$work/sled.crate" https://static.crates.io/crates/sled/sled-0.34.7.crate
fi
echo "$expected_sha256  $work/sled.crate" | sha256sum --check --quiet

tar -xzf "$work/sled.crate" -C "$work"
mkdir "$work/expected"
for kept in src Cargo.toml LICENSE-APACHE LICENSE-MIT README.md; do
  cp -r "$work/sled-0.34.7/$kept" "$work/expected/"
done
(cd "$work/expected" && patch --quiet -p1 < "$here/sled.patch")
diff -r "$work/expected" sled
echo "vendor/sled: sled 0.34.7 from crates.io plus vendor/sled.patch, nothing else"
