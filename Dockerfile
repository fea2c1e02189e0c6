# trio-idle container image: the documented install (docs/operations.md, "Install") in a
# python:3.11-slim base, run as an unprivileged user. See docs/scaling.md for several
# instances, deploy/compose.yaml to try three of them against a local Postgres.
#
#   docker build -t trio-idle .
#   docker run -d --name trio-idle -p 127.0.0.1:9310:9310 \
#     -v /etc/trio-idle/env:/etc/trio-idle/env:ro -v trio-idle-state:/var/lib/trio-idle/state \
#     trio-idle --env-file /etc/trio-idle/env                     # = trio-idle serve ...
#   docker run ... trio-idle --env-file /etc/trio-idle/env --once   # flags go after the image
#   docker run ... --entrypoint trio-idle trio-idle db migrate --env-file /etc/trio-idle/env
#
# --env-file after the image is trio-idle's: it reads /etc/trio-idle/env with systemd's
# rules, as the unit and the PM2 file do. `docker run --env-file` reads a different format
# (quotes kept as part of the value): use it only for files without quotes or escapes.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY trio_idle ./trio_idle
# the units' Documentation= (file:///usr/share/doc/trio-idle/...), as on a host install
COPY docs/*.md /usr/share/doc/trio-idle/
# the same three steps as a host install; no compiler: every dependency ships wheels
RUN python3 -m venv /opt/trio-idle \
    && /opt/trio-idle/bin/pip install -c constraints.txt . \
    && ln -s /opt/trio-idle/bin/trio-idle /usr/local/bin/trio-idle \
    && trio-idle --version \
    && rm -rf /src

RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/trio-idle --create-home \
    --shell /usr/sbin/nologin trio-idle \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/trio-idle/state
USER 10001:10001
WORKDIR /var/lib/trio-idle

# The SQLite state (what was scanned, for the catch-up after a restart) lives in a volume:
# a recreated container keeps it instead of treating every mailbox as new. The default
# state file is $STATE_DIRECTORY/state.sqlite3, as under systemd's StateDirectory=.
# Shared mode (TRIO_IDLE_STATE=postgres) keeps it in Postgres and needs no volume.
ENV STATE_DIRECTORY=/var/lib/trio-idle/state
VOLUME ["/var/lib/trio-idle/state"]

# The health port listens on every interface of the container (publish it only where a
# scraper must reach it); /status stays off without TRIO_IDLE_STATUS_TOKEN.
ENV TRIO_IDLE_HEALTH_ADDR=0.0.0.0:9310
EXPOSE 9310

# /healthz with the standard library only (no curl in the image): 200 → healthy. It asks
# 127.0.0.1 on the port of TRIO_IDLE_HEALTH_ADDR, whichever interface that names.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os,sys,http.client as h; p=int(os.environ.get('TRIO_IDLE_HEALTH_ADDR','9310').rpartition(':')[2]); c=h.HTTPConnection('127.0.0.1',p,timeout=4); c.request('GET','/healthz'); sys.exit(c.getresponse().status!=200)"]

# SIGTERM: every session LOGOUTs within TRIO_IDLE_SHUTDOWN_TIMEOUT (5 s); give the
# container at least 15 s (docker stop -t 15, compose stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["trio-idle", "serve"]
