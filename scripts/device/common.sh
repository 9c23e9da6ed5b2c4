# Sourced by the device runs: the packed programs, and the tree at the absolute path the tests were
# built for (/work/main: the test data and model paths are compiled in).
export LD_LIBRARY_PATH=$PWD/.device/lib:${LD_LIBRARY_PATH:-}
export OMP_NUM_THREADS=8 PYTHONUNBUFFERED=1
mkdir -p /work; [ -e /work/main ] || ln -s "$PWD" /work/main
B=$PWD/.device/bin
step() { echo; echo "=== $* ($(date +%T))"; }
