# Sourced by the device scripts: make the wheels carried in .whl/ (diffusers and what it needs, which
# the GPU machine lacks and cannot download) importable from /tmp/site, installing them once.
# Expects $PY; exports PYTHONPATH with /tmp/site and the repository root.
if [ -d /tmp/site ]; then export PYTHONPATH=/tmp/site:${PYTHONPATH:-}; fi
if compgen -G ".whl/*.whl" >/dev/null && ! $PY -c "import diffusers" >/dev/null 2>&1; then
  echo "== installing $(ls .whl/*.whl | wc -l) carried wheel(s) into /tmp/site"
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || echo "warning: wheel install failed"
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
