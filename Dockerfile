# One image for the three Courier services. The default command serves the gateway;
# compose.yaml runs the processor and the notifier from the same image with `command:`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed, unprivileged user. /data and /blobs are created here and owned by it, so named
# volumes mounted there (the stores, the notifier's log, uploaded files) start out writable.
RUN groupadd --system --gid 10001 courier \
    && useradd --system --uid 10001 --gid courier --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin courier \
    && mkdir -p /data /blobs \
    && chown courier:courier /data /blobs

WORKDIR /app

# Dependencies first, pinned by the lock file, so that a code change does not reinstall them.
COPY pyproject.toml requirements.lock README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -c requirements.lock -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY contracts/ contracts/
COPY services/ services/
RUN pip install --no-cache-dir -c requirements.lock .

USER courier

# Where a container keeps its state and listens without compose (`docker run`): the stores
# and the notifier's log on /data, uploaded files on /blobs, the gateway and the consumers'
# health endpoints on every interface of the container.
ENV COURIER_DATA_DIR=/data \
    COURIER_BLOB_DIR=/blobs \
    COURIER_NOTIFY_LOG=/data/notifications.jsonl \
    COURIER_HOST=0.0.0.0 \
    COURIER_HEALTH_HOST=0.0.0.0

# 8000: the gateway's HTTP API; 8081: a consumer's /healthz and /readyz (COURIER_HEALTH_PORT).
EXPOSE 8000 8081

# Exec form: the Python process itself receives SIGTERM and drains in-flight work.
CMD ["python", "-m", "services.gateway"]
