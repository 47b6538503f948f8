#!/usr/bin/env bash
# Fetch the language-model datasets from their standard public locations and check them.
#
#   bash scripts/download_data.sh enwik8 [DEST]        # DEST default: data/enwik8
#   bash scripts/download_data.sh wikitext103 [DEST]   # DEST default: data/wikitext-103
#
# enwik8: http://mattmahoney.net/dc/enwik8.zip, unzipped to DEST/enwik8 (100,000,000 bytes,
#   md5 checked). wikitext103: wikitext-103-v1.zip (tokens, not raw) from wikitext.smerity.com,
#   falling back to the original Salesforce S3 address,
#   unzipped to DEST/wiki.{train,valid,test}.tokens (line counts checked).
# Nothing in the experiment code downloads; this script is the only place that does.
set -euo pipefail

name="${1:-}"
case "$name" in
  enwik8) dest="${2:-data/enwik8}" ;;
  wikitext103) dest="${2:-data/wikitext-103}" ;;
  *) echo "usage: $0 {enwik8|wikitext103} [DEST]" >&2; exit 2 ;;
esac
mkdir -p "$dest"

fetch() {  # url out
  if command -v curl >/dev/null; then curl -fL --retry 3 -o "$2" "$1"; else wget -O "$2" "$1"; fi
}

if [[ "$name" == enwik8 ]]; then
  if [[ ! -f "$dest/enwik8" ]]; then
    fetch http://mattmahoney.net/dc/enwik8.zip "$dest/enwik8.zip"
    (cd "$dest" && python3 -c "import zipfile; zipfile.ZipFile('enwik8.zip').extract('enwik8')")
  fi
  size=$(wc -c < "$dest/enwik8")
  [[ "$size" -eq 100000000 ]] || { echo "enwik8 has $size bytes, expected 100000000" >&2; exit 1; }
  sum=$(md5sum "$dest/enwik8" | cut -d' ' -f1)
  expected=a1fa5ffddb56f4953e226637dabbb36a  # published at mattmahoney.net/dc/textdata.html
  if [[ "$sum" != "$expected" ]]; then
    echo "enwik8 md5 $sum differs from the published $expected" >&2
    exit 1
  fi
  echo "enwik8 ready in $dest (100,000,000 bytes, md5 ok)"
else
  if [[ ! -f "$dest/wiki.train.tokens" ]]; then
    # The live mirror first; the original S3 address (dead in several trackers) as a fallback.
    fetch https://wikitext.smerity.com/wikitext-103-v1.zip "$dest/wikitext-103-v1.zip" \
      || fetch https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip \
        "$dest/wikitext-103-v1.zip"
    (cd "$dest" && python3 - <<'PY'
import os, zipfile
with zipfile.ZipFile("wikitext-103-v1.zip") as z:
    for n in z.namelist():
        base = os.path.basename(n)
        if base.startswith("wiki.") and base.endswith(".tokens"):
            with z.open(n) as src, open(base, "wb") as dst:
                dst.write(src.read())
PY
    )
  fi
  for split_lines in train:1801350 valid:3760 test:4358; do
    split=${split_lines%%:*}; want=${split_lines##*:}
    got=$(wc -l < "$dest/wiki.$split.tokens")
    [[ "$got" -eq "$want" ]] || { echo "wiki.$split.tokens has $got lines, expected $want" >&2; exit 1; }
  done
  echo "wikitext-103 ready in $dest (line counts ok)"
fi
