#!/usr/bin/env bash
# Fill the ignored folder .dev/ with what the GPU machine lacks (it has torch, transformers,
# numpy, safetensors, pyyaml, tqdm, matplotlib, jinja2, pyarrow, tokenizers; see
# ../shared/tools/README.md): Python 3.12 x86-64 wheels, and a copy of gpu_check.py, which is a
# measuring tool of the workplace and is never committed. Then: benchmarks/gpu_session.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.dev/' .git/info/exclude 2>/dev/null || echo /.dev/ >> .git/info/exclude
mkdir -p .dev/whl
cp ../shared/tools/gpu_check.py .dev/
for p in transformer-lens==3.9.0 better-abc fancy-einsum beartype typeguard datasets==5.2.0 dill \
         multiprocess==0.70.19 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types typing-inspection \
         typing_extensions e2e-sae==2.1.1 python-dotenv; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .dev/whl "$p"
done
du -sh .dev
