#!/usr/bin/env bash
# Prepare what bench_gpu.py needs on a lent GPU machine that cannot reach any package registry (issue #29).
#
# That machine's Python 3.12 has torch (CUDA), numpy, scipy and tqdm; bench_gpu.py also imports SimpleITK and
# dynamic-network-architectures, which travel as wheels. Each call to the machine may carry at most 64 MiB with the
# working tree (about 33 MB), and the SimpleITK wheel alone is 53 MB, so it travels in two calls: this script
# downloads both wheels into .whl/ (git-ignored) and splits SimpleITK into .whl/part1/ and .whl/part2/.
#
# Then, on the machine, two calls in a row (it stays warm 30 s between calls):
#   1. carry [".whl/part1"]:  mkdir -p /tmp/whl && cp .whl/part1/* /tmp/whl/
#   2. carry [".whl/part2"]:  cp .whl/part2/* /tmp/whl/ && cd /tmp/whl && cat sitk.part.* > $(cat sitk.name) &&
#      python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/whl/*.whl && cd - >/dev/null &&
#      PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 Testing/benchmarks/bench_gpu.py /tmp/bgpu -o $OUT/bench_gpu.json
#      (timeout_s 540: the table is sized for at most 8 minutes on an H100)
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
rm -rf .whl && mkdir -p .whl/part1 .whl/part2
sitk_version=$(.venv/bin/python -c 'import SimpleITK; print(SimpleITK.__version__)')
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "SimpleITK==${sitk_version}" dynamic-network-architectures==0.4.4
sitk=$(cd .whl && ls -1 simpleitk-*.whl)
mv .whl/dynamic_network_architectures-*.whl .whl/part1/
echo "$sitk" > .whl/part2/sitk.name
split -n 2 -d ".whl/$sitk" .whl/sitk.part.
mv .whl/sitk.part.00 .whl/part1/ && mv .whl/sitk.part.01 .whl/part2/ && rm ".whl/$sitk"
du -sh .whl/part1 .whl/part2
