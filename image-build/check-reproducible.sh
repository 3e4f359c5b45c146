#!/usr/bin/env bash
# Builds the same image twice (same inputs, signing material and
# SOURCE_DATE_EPOCH) and compares the outputs.
#
#   image-build/check-reproducible.sh --role rx --binary target/release/gateway-rx \
#       [--config FILE --keys DIR] [other image-build options]
#
# Expected: the disk image and the root slot image are bit-identical. The
# RAUC bundle is not: rauc 1.8 draws a random dm-verity salt for every
# bundle (no option sets it), so the verity hash tree after the payload and
# the CMS signature at the end (which also carries its signing time)
# differ. Its payload - the squashfs holding the manifest and the root slot
# image - is compared byte for byte instead, and `rauc info` must report
# the same rootfs checksum. The build manifest differs only in the bundle's
# sha256.
set -euo pipefail
cd "$(dirname "$0")/.."

epoch="${SOURCE_DATE_EPOCH:-1747699200}"
work="$(mktemp -d "${TMPDIR:-/tmp}/weir-repro.XXXXXX")"
trap 'rm -rf "$work"' EXIT

cargo build --release -q -p image-build
for run in a b; do
  echo "== build $run"
  ./target/release/image-build "$@" --out "$work/$run" \
    --signing-dir "$work/signing" --source-date-epoch "$epoch" >"$work/$run.log" 2>&1 \
    || { tail -40 "$work/$run.log"; exit 1; }
done

role_stem() { basename "$(ls "$1"/weir-*.img)" .img; }
stem="$(role_stem "$work/a")"
status=0
for f in "$stem.img" "$stem-rootfs.squashfs"; do
  if cmp -s "$work/a/$f" "$work/b/$f"; then
    echo "identical: $f $(sha256sum <"$work/a/$f" | cut -d' ' -f1)"
  else
    echo "DIFFERS:   $f"; status=1
  fi
done

# The bundle's payload is a squashfs; its size (bytes_used) is at offset 40.
bundle="$stem.raucb"
used="$(od -An -t u8 -j 40 -N 8 "$work/a/$bundle" | tr -d ' ')"
if cmp -s -n "$used" "$work/a/$bundle" "$work/b/$bundle"; then
  echo "identical: $bundle payload (first $used bytes); verity salt/hash tree and signature differ as expected"
else
  echo "DIFFERS:   $bundle payload"; status=1
fi
sums() { rauc info --keyring="$work/signing/keyring.pem" --output-format=json "$1" 2>/dev/null \
  | grep -o '"checksum" *: *"[0-9a-f]*"'; }
if [ "$(sums "$work/a/$bundle")" = "$(sums "$work/b/$bundle")" ]; then
  echo "identical: $bundle rootfs checksum per rauc info"
else
  echo "DIFFERS:   $bundle rootfs checksum"; status=1
fi

if diff <(grep -v '"sha256"' "$work/a/$stem.manifest.json") \
        <(grep -v '"sha256"' "$work/b/$stem.manifest.json") >/dev/null \
   && [ "$(diff "$work/a/$stem.manifest.json" "$work/b/$stem.manifest.json" | grep -c '^<')" -le 1 ]; then
  echo "identical: $stem.manifest.json except the bundle's sha256"
else
  echo "DIFFERS:   $stem.manifest.json"; diff "$work/a/$stem.manifest.json" "$work/b/$stem.manifest.json" || true
  status=1
fi
exit $status
