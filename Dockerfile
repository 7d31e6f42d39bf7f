# The bridge as a container image: `llm-bridge run` by default; the same image
# serves the mock LLM (compose.yaml's mock-llm profile) and runs the bridge's
# health check (`llm-bridge broker check`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bridge ./bridge
RUN pip install . && mkdir -p /data && chmod 0777 /data

# compose.yaml runs it as the owner of the project folder (LOCAL_UID:LOCAL_GID);
# alone it runs as nobody.
USER 65534:65534
ENV BRIDGE_DATA_DIR=/data
WORKDIR /data

ENTRYPOINT ["llm-bridge"]
CMD ["run"]
