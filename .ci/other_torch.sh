#!/usr/bin/env bash
# The whole pytest suite again, on another torch, with the extension the
# main job built (no rebuild): the binding speaks DLPack and links no
# libtorch, so one build must serve every torch. Its own venv; the main
# one is left as is.
#
#   .ci/other_torch.sh                       # torch 2.14.1 (on this machine's disk)
#   OTHER_TORCH="torch==2.4.1" OTHER_NUMPY="numpy<2" .ci/other_torch.sh
#                                            # a download of about 3 GB
#
# Run from the main job, after `pip install -e .` built diffq_c/_C*.so in
# place. torch 2.14.1 is a CUDA build here (5.4 GB in the venv, from the
# disk in about a minute); it runs on the CPU like the CPU build.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OTHER_TORCH=${OTHER_TORCH:-torch==2.14.1}
OTHER_NUMPY=${OTHER_NUMPY:-numpy}
VENV=${OTHER_TORCH_VENV:-$ROOT/.venv-other-torch}
cd "$ROOT"
start=$(date +%s)

built=$(ls diffq_c/_C*.so 2>/dev/null | head -n 1 || true)
if [ -z "$built" ]; then
    echo "other_torch.sh: no diffq_c/_C*.so here: run the main job's install first" >&2
    exit 1
fi
sum_before=$(sha256sum "$built")

python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$OTHER_TORCH"
"$VENV/bin/python" -m pip install -q "diffq==0.2.4" || "$VENV/bin/python" -m pip install -q "diffq-fixed==0.2.4"
# the test and demo extras of pyproject.toml, without installing diffq_c itself
"$VENV/bin/python" -m pip install -q pytest "$OTHER_NUMPY" scikit-learn tqdm matplotlib

# the source tree's package, with the main job's build in it
PYTHONPATH="$ROOT" "$VENV/bin/python" - "$OTHER_TORCH" <<'EOF'
import os, sys
import torch, diffq, diffq_c
want = sys.argv[1].split("==", 1)[1]
assert torch.__version__.split("+")[0] == want, (torch.__version__, want)
assert diffq.__version__ == "0.2.4", diffq.__version__
assert os.path.dirname(diffq_c.__file__) == os.path.join(os.getcwd(), "diffq_c"), diffq_c.__file__
print(f"other_torch.sh: torch {torch.__version__}, diffq {diffq.__version__}, diffq_c from {diffq_c.__file__}")
EOF
PYTHONPATH="$ROOT" "$VENV/bin/python" -m pytest -q -p no:cacheprovider

if [ "$(sha256sum "$built")" != "$sum_before" ]; then
    echo "other_torch.sh: the extension was rebuilt or changed: not one build" >&2
    exit 1
fi
echo "other_torch.sh: OK on $OTHER_TORCH in $(( $(date +%s) - start )) s"
