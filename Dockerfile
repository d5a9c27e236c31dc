# The project image: the orchestrator (`saga run`) and the demo services (`saga-service NAME`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY saga ./saga
COPY contracts ./contracts
COPY services ./services
COPY tools ./tools
RUN pip install . \
    && useradd --create-home --uid 10001 saga \
    && mkdir /data && chown saga /data
USER saga
VOLUME ["/data"]
CMD ["saga", "--help"]
