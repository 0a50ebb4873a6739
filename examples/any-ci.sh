#!/bin/sh
# Any CI system: point pip and npm at an artifact-proxy repository with a fresh, short-lived token,
# then build. Needs the artifact-proxy CLI (pip install artifact-proxy, or the container image)
# and one credential in the environment, from the CI system's secret store:
#   ARTIFACT_PROXY_TOKEN        a token of the domain (exchanged for a fresh one), or
#   ARTIFACT_PROXY_ADMIN_TOKEN  the proxy's administrator secret (issues one for --principal)
# Settings (with their defaults):
#   ARTIFACT_PROXY_ENDPOINT=http://127.0.0.1:8080  ARTIFACT_PROXY_DOMAIN=default
#   ARTIFACT_PROXY_REPO=public  ARTIFACT_PROXY_TOKEN_DURATION=1h
#   PIP="python -m pip"  NPM=npm  PIP_TARGET (optional: install into this folder)
set -eu

endpoint=${ARTIFACT_PROXY_ENDPOINT:-http://127.0.0.1:8080}
# The export lines of `artifact-proxy env`: PIP_INDEX_URL, npm_config_registry, an .npmrc that
# reads the token from ARTIFACT_PROXY_TOKEN, and the token itself (never echoed).
# (Assigned first: with `set -e` a failing command substitution then stops the script.)
exports=$(artifact-proxy env --endpoint "$endpoint" \
  --domain "${ARTIFACT_PROXY_DOMAIN:-default}" --repo "${ARTIFACT_PROXY_REPO:-public}" \
  --duration "${ARTIFACT_PROXY_TOKEN_DURATION:-1h}" --principal ci --tool pip --tool npm)
eval "$exports"

# The build: whatever your project runs. Both installs go through the proxy, with the token.
if [ -f requirements.txt ]; then
  ${PIP:-python -m pip} install --disable-pip-version-check --no-input ${PIP_TARGET:+--target "$PIP_TARGET"} \
    -r requirements.txt
fi
if [ -f package.json ]; then
  ${NPM:-npm} install --no-audit --no-fund
fi
