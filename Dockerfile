# autoscaler: the proxy, the controller and the admin server in one process.
#   docker build -t autoscaler .
#   docker run -p 8080:8080 -p 9091:9091 -e FLY_API_TOKEN=... -e AUTOSCALER_ADMIN__TOKEN=... \
#     -v $PWD/config/scale-to-zero.yaml:/etc/autoscaler/autoscaler.yaml:ro autoscaler
# The admin server listens on 0.0.0.0:9091, where the published port reaches it, so it
# requires AUTOSCALER_ADMIN__TOKEN (without it the autoscaler refuses to start; /healthz and
# /metrics stay open unless admin.protect_metrics). The baked-in config/autoscaler.yaml names
# no Machines API, so `run` refuses to start until you mount your own config (or set
# AUTOSCALER_FLY__API_URL); `docker run ... autoscaler run --emulator` tries it on the
# embedded emulator instead, with no Fly account.
FROM python:3.12-slim AS build
# A C compiler: the proxy's data path and the policy are compiled with mypyc (setup.py,
# AUTOSCALER_COMPILE).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY build_support ./build_support
COPY autoscaler ./autoscaler
RUN AUTOSCALER_COMPILE=1 pip wheel --no-cache-dir --wheel-dir /wheels ".[fast,cluster]"

FROM python:3.12-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin autoscaler
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels "autoscaler[fast,cluster]" \
    && rm -rf /wheels
COPY config/autoscaler.yaml /etc/autoscaler/autoscaler.yaml
ENV AUTOSCALER_CONFIG=/etc/autoscaler/autoscaler.yaml \
    AUTOSCALER_PROXY__LISTEN=0.0.0.0:8080 \
    AUTOSCALER_ADMIN__LISTEN=0.0.0.0:9091 \
    PYTHONUNBUFFERED=1
USER autoscaler
# 8080: the proxy (client traffic), on every IPv4 address: a published port (docker run -p)
# and Fly's proxy reach the container over IPv4 ([::] would take IPv4 too, dual stack, but
# needs a kernel with IPv6, which not every Docker host has). 9091: admin (/metrics,
# /healthz, /readyz, /status), on every IPv4 address; the health check asks it on loopback.
EXPOSE 8080 9091
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys; from autoscaler.aio import urlopen_direct; sys.exit(urlopen_direct('http://127.0.0.1:9091/healthz', 2).status != 200)"]
ENTRYPOINT ["autoscaler"]
CMD ["run"]
