# artifact-proxy as a sidecar: listens on 0.0.0.0:8080, keeps its data in /data, runs as a
# non-root user. Configure by environment (ARTIFACT_PROXY_CONFIG, ARTIFACT_PROXY_ADMIN_TOKEN,
# ARTIFACT_PROXY_OFFLINE, PIP_INDEX_URL, ...) or mount a TOML file and point ARTIFACT_PROXY_CONFIG
# at it.

# --- build: the wheel, and every dependency as a wheel --------------------------------------------
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY config ./config
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# --- runtime: only the installed wheels --------------------------------------------------------------
FROM python:3.11-slim
COPY --from=build /wheels /wheels
# The version is pinned by the wheel built above; there is no index here to drift from.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-index --find-links /wheels artifact-proxy \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin proxy \
    && mkdir -p /data \
    && chown proxy /data
USER 10001
ENV ARTIFACT_PROXY_LISTEN=0.0.0.0:8080 \
    ARTIFACT_PROXY_DATA_DIR=/data \
    PYTHONUNBUFFERED=1
EXPOSE 8080
VOLUME ["/data"]
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/-/healthz', timeout=2).status != 200)"]
STOPSIGNAL SIGTERM
# Exec form: the server is PID 1 and gets SIGTERM itself (it drains, then exits).
ENTRYPOINT ["artifact-proxy"]
CMD ["serve"]
