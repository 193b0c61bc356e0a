# One image for every role: the `shardgrad` command picks it
# (`coordinator`, `worker`, or a client command such as `submit`).
#
#   docker build -t shardgrad .                      # with a package registry
#   docker-compose up -d --build --scale worker=4    # see docs/docker.md
#
# Offline build (no package index reachable from the build): put wheels for every
# dependency in .wheelhouse/ first and pass
#   --build-arg PIP_INSTALL_ARGS="--no-index --find-links /src/.wheelhouse"
# BASE_IMAGE may be any image with Python 3.11 and its venv module.
ARG BASE_IMAGE=python:3.11-slim

# ---- deps: a venv with the dependencies and the `data` extra ------------------------------
FROM ${BASE_IMAGE} AS deps
ARG PIP_INSTALL_ARGS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
# Dependencies in their own stage, so that editing the sources does not reinstall them.
# The wildcard copies .wheelhouse/ when it exists and nothing when it does not
# (pyproject.toml goes along only because COPY needs one source that always exists).
COPY pyproject.toml .wheelhous[e] /src/.wheelhouse/
COPY pyproject.toml /src/
RUN /opt/venv/bin/python -c "import tomllib; p = tomllib.load(open('/src/pyproject.toml', 'rb')); \
print('\n'.join(p['project']['dependencies'] + p['project']['optional-dependencies']['data'] \
+ p['build-system']['requires']))" > /tmp/requirements.txt \
 && /opt/venv/bin/pip install ${PIP_INSTALL_ARGS} -r /tmp/requirements.txt

# ---- build: the project's own wheel ---------------------------------------------------------
FROM deps AS build
COPY . /src
RUN /opt/venv/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels /src

# ---- runtime: the venv and the project, no sources, no wheelhouse ---------------------------
FROM ${BASE_IMAGE}
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SHARDGRAD_STATE_DIR=/state \
    SHARDGRAD_DATA_ROOT=/data
RUN useradd --system --create-home --home-dir /home/shardgrad --uid 10001 shardgrad \
 && mkdir -p /state /data \
 && chown shardgrad:shardgrad /state   # an empty named volume mounted here inherits this owner
COPY --from=deps /opt/venv /opt/venv
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-index --no-deps /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels \
 && python -c "import shardgrad, numpy, zmq, msgpack, sklearn"
USER shardgrad
WORKDIR /home/shardgrad
# 5555: workers connect here; 5556: clients (submit, status, watch, fetch, cancel);
# 8080: the read-only dashboard and /metrics when SHARDGRAD_HTTP asks for it (compose does).
EXPOSE 5555 5556 8080
ENTRYPOINT ["shardgrad"]
CMD ["--help"]
