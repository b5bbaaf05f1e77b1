# The API node's image: `fluxredux serve --workers 0`. Slim: no torch, no model packages
# (the HTTP process never imports them), about 400 MB. Build from the repository root:
#   docker build -f deploy/docker/api.Dockerfile -t fluxredux-api:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# Wheels of the package and its server extra, built once, installed in the next stage.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[server]"

FROM ${PYTHON_IMAGE}
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels "fluxredux[server]" \
    && rm -rf /wheels \
    && useradd --uid 10001 --create-home fluxredux \
    && mkdir -p /var/lib/fluxredux /srv/files && chown 10001 /var/lib/fluxredux /srv/files
USER 10001
ENV FLUXREDUX_DATA_DIR=/var/lib/fluxredux
EXPOSE 8000
ENTRYPOINT ["fluxredux"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "0"]
