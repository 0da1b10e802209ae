# source me: puts the in-tree packages on PYTHONPATH (after scripts/dev-build)
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$_root/python:$_root/convert:$_root/bench:$_root/sparsify${PYTHONPATH:+:$PYTHONPATH}"
