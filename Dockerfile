# autoscaler: the proxy, the controller and the admin server in one process.
#   docker build -t autoscaler .
#   docker run -p 8080:8080 -p 9091:9091 -e FLY_API_TOKEN=... \
#     -v $PWD/config/scale-to-zero.yaml:/etc/autoscaler/autoscaler.yaml:ro autoscaler
FROM python:3.12-slim AS build
# A C compiler: the proxy's data path is compiled with mypyc (setup.py, AUTOSCALER_COMPILE).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY build_support ./build_support
COPY autoscaler ./autoscaler
RUN AUTOSCALER_COMPILE=1 pip wheel --no-cache-dir --wheel-dir /wheels ".[fast]"

FROM python:3.12-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin autoscaler
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels "autoscaler[fast]" \
    && rm -rf /wheels
COPY config/autoscaler.yaml /etc/autoscaler/autoscaler.yaml
ENV AUTOSCALER_CONFIG=/etc/autoscaler/autoscaler.yaml \
    AUTOSCALER_PROXY__LISTEN=[::]:8080 \
    PYTHONUNBUFFERED=1
USER autoscaler
# 8080: the proxy (client traffic). 9091: admin (/metrics, /healthz, /readyz, /status).
EXPOSE 8080 9091
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9091/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["autoscaler"]
CMD ["run"]
