#!/usr/bin/env bash
# Here, before a session with a GPU runs the check of issue 40: gather what scripts/gpu_check.sh needs on the
# device machine (which has torch, numpy, scipy, scikit-image, matplotlib and tqdm, but no network), check that
# it fits what travels (64 MiB: the working tree plus the carried folders), and print the `run` call.
#
#   PYTHON=/path/to/venv/bin/python bash scripts/prepare_gpu_check.sh [CASES]
#
# 1. .whl/: python 3.12 manylinux wheels of what `import medseg` needs beyond that machine's packages
#    (SimpleITK, nibabel; pydicom, highdicom, pyjpegls once medseg imports them; monai likewise), at the
#    versions PYTHON has installed. SimpleITK's 53 MB wheel is repacked as an xz tarball of its contents (28 MB;
#    a few minutes, once).
# 2. .gpu_check/hippocampus/: the first CASES (default 80) hippocampus cases of HIPPOCAMPUS (default
#    ../shared/data/hippocampus) with a dataset.json listing them; bench_gpu.py holds 20 of them out.
# Both folders are git-ignored; nothing here is committed. Re-running reuses the wheels already there.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
CASES=${1:-80}
DATA=${HIPPOCAMPUS:-../shared/data/hippocampus}
PY=${PYTHON:-python3}
LIMIT=$((64 * 1024 * 1024))
for folder in .whl .gpu_check; do
    git check-ignore -q "$folder/x" || { echo "$folder/ is not git-ignored: add /$folder/ to .gitignore" >&2; exit 2; }
done

mkdir -p .whl
names="SimpleITK nibabel"
if grep -rqE '^\s*(import|from) (pydicom|highdicom)\b' medseg; then names="$names pydicom highdicom pyjpegls"; fi
if grep -rqE '^\s*(import|from) monai\b' medseg; then names="$names monai"; fi
for name in $names; do
    version=$("$PY" -c 'import sys, importlib.metadata as m; print(m.version(sys.argv[1]))' "$name" 2>/dev/null || true)
    lower=$(echo "$name" | tr 'A-Z-' 'a-z_')
    # one version of each: another one stops the whole install there
    find .whl -maxdepth 1 -iname "${lower}-*" ! -iname "${lower}-${version}-*" -print -delete
    if ls .whl | grep -qi "^${lower}-${version}"; then echo "have $name $version"; continue; fi
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$name${version:+==$version}"
    echo "downloaded $name ${version:-(latest)}"
done
for whl in .whl/simpleitk-*.whl .whl/SimpleITK-*.whl; do
    [ -e "$whl" ] || continue
    echo "repacking $whl as ${whl%.whl}.tar.xz (a few minutes) ..."
    tmp=$(mktemp -d)
    unzip -q "$whl" -d "$tmp"
    tar -C "$tmp" -cf - . | xz -6 -T0 >"${whl%.whl}.tar.xz.tmp"
    mv "${whl%.whl}.tar.xz.tmp" "${whl%.whl}.tar.xz"
    rm -rf "$tmp" "$whl"
done

rm -rf .gpu_check/hippocampus
"$PY" - "$DATA" .gpu_check/hippocampus "$CASES" <<'PYEOF'
import json, shutil, sys
from pathlib import Path

src, dst, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
meta = json.loads((src / "dataset.json").read_text())
entries = sorted(meta["training"], key=lambda e: e["label"])[:n]
for entry in entries:
    for key in ("image", "label"):
        rel = Path(entry[key])
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / rel, dst / rel)
meta.update(training=entries, numTraining=len(entries), test=[], numTest=0)
(dst / "dataset.json").write_text(json.dumps(meta, indent=1))
print(f"copied {len(entries)} hippocampus cases into {dst}")
PYEOF

tracked=$(git ls-files -z | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
carried=$(du -cb .whl .gpu_check | tail -1 | cut -f1)
total=$((tracked + ${untracked:-0} + carried))
ls -la .whl
awk -v t="$tracked" -v u="${untracked:-0}" -v c="$carried" 'BEGIN { printf "travels: working tree %.1f MiB + .whl and .gpu_check %.1f MiB = %.1f MiB (limit 64 MiB)\n", (t + u) / 1048576, c / 1048576, (t + u + c) / 1048576 }'
if [ "$total" -ge "$LIMIT" ]; then echo "too large: carry fewer cases (bash $0 N)" >&2; exit 1; fi
echo
echo 'the device call (one run; about 8 minutes on an H100; rerun once if it fails):'
echo '  run(command="bash scripts/gpu_check.sh", carry=[".whl", ".gpu_check"], timeout_s=600)'
