# A small image of the proxy: listens on 0.0.0.0:8080, keeps its data in /data.
# Configure by environment (ARTIFACT_PROXY_CONFIG, ARTIFACT_PROXY_OFFLINE, PIP_INDEX_URL, ...)
# or mount a TOML file and set ARTIFACT_PROXY_CONFIG to its path.
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY config ./config
RUN pip install --no-cache-dir . && useradd --system --home /data proxy && mkdir -p /data && chown proxy /data

USER proxy
ENV ARTIFACT_PROXY_LISTEN=0.0.0.0:8080 \
    ARTIFACT_PROXY_DATA_DIR=/data
EXPOSE 8080
VOLUME ["/data"]
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/-/readyz').status != 200)"
STOPSIGNAL SIGTERM
CMD ["artifact-proxy", "serve"]
