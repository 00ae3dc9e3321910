# relayd in a container: docker build -t relayd .   (see docs/deploying.md, "Running in a container")
#
# Build arguments:
#   BASE                 any image with Python >= 3.11 and its venv module (python3 on PATH)
#   EXTRAS               optional extras of the relayd package, e.g. EXTRAS=redis
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST
#                        a package index other than PyPI; build with --network host to reach one on localhost
ARG BASE=python:3.12-slim

FROM ${BASE} AS build
ARG EXTRAS=""
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# The context holds only what .dockerignore lets through: the package sources and deploy/ files.
COPY . /src
# pip and setuptools are only needed to install; the runtime venv goes without them.
RUN python3 -m venv /opt/relayd \
 && /opt/relayd/bin/pip install --quiet "/src${EXTRAS:+[$EXTRAS]}" \
 && /opt/relayd/bin/pip uninstall --quiet --yes pip setuptools \
 && cp /src/deploy/healthcheck.py /opt/relayd/healthcheck.py

FROM ${BASE}
RUN groupadd --system --gid 10001 relayd \
 && useradd --system --uid 10001 --gid relayd --home-dir /var/lib/relayd --no-create-home \
        --shell /usr/sbin/nologin relayd \
 && mkdir -p /var/lib/relayd \
 && chown relayd:relayd /var/lib/relayd \
 && chmod 0750 /var/lib/relayd
COPY --from=build /opt/relayd /opt/relayd
COPY deploy/relayd.conf /etc/relayd/relayd.conf
ENV PATH=/opt/relayd/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

# Numeric, so that orchestrators enforcing "run as non-root" can verify it.
USER 10001:10001
# A new named volume takes this directory's owner, so relayd can write its database there.
WORKDIR /var/lib/relayd
VOLUME /var/lib/relayd
EXPOSE 3000
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/opt/relayd/bin/python", "/opt/relayd/healthcheck.py"]
# relayd stops accepting, closes sessions with 1001, commits and exits within [server] shutdown_timeout_s (5 s),
# inside docker stop's default 10 s. The exec form makes relayd PID 1, so it receives the signal itself.
STOPSIGNAL SIGTERM
# RELAYD_CONFIG names the file for every command that reads one, so `docker run IMAGE check --relay URL`,
# `... stats` and `... config` work on the same entry point as the relay itself.
ENV RELAYD_CONFIG=/etc/relayd/relayd.conf
ENTRYPOINT ["/opt/relayd/bin/relayd"]
