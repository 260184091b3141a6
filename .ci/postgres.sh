#!/usr/bin/env bash
# Start a throw-away PostgreSQL server on 127.0.0.1 for the sweep tests (several workers sharing one
# Optuna study through PostgreSQL, as on several machines).
#
#   url=$(.ci/postgres.sh) && export MIXERLAB_TEST_POSTGRES_URL="$url"
#
# Installs PostgreSQL with apt-get when it is missing, creates a cluster in $PGDATA (default
# /tmp/mixerlab-pg) owned by the `postgres` user (the server refuses to run as root), listening on
# 127.0.0.1 only, with a `mixerlab` user (password auth) owning a `mixerlab` database. Prints the
# SQLAlchemy URL on stdout (everything else goes to stderr) and writes it to $PGDATA/url.
# Running it again with the server up just prints the URL. Stop it with
#   runuser -u postgres -- pg_ctl -D /tmp/mixerlab-pg stop
set -euo pipefail
PGDATA=${PGDATA:-/tmp/mixerlab-pg}
PGPORT=${PGPORT:-5432}
USER_NAME=mixerlab
PASSWORD=mixerlab
URL="postgresql+psycopg2://$USER_NAME:$PASSWORD@127.0.0.1:$PGPORT/$USER_NAME"

log() { echo "postgres.sh: $*" >&2; }

bin_dir() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
  [ -n "$d" ] && [ -x "$d/initdb" ] && echo "$d"
}

if ! BIN=$(bin_dir); then
  log "installing PostgreSQL with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
  BIN=$(bin_dir)
fi
as_pg() { runuser -u postgres -- "$@"; }

if [ -f "$PGDATA/url" ] && as_pg "$BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
  cat "$PGDATA/url"
  exit 0
fi

if [ ! -f "$PGDATA/PG_VERSION" ]; then
  log "creating a cluster in $PGDATA"
  mkdir -p "$PGDATA"
  chown postgres: "$PGDATA"
  chmod 700 "$PGDATA"
  # Local socket: trust (to create the user below); TCP on loopback: passwords.
  as_pg "$BIN/initdb" -D "$PGDATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 >&2
fi

log "starting the server on 127.0.0.1:$PGPORT"
as_pg "$BIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/server.log" -w \
  -o "-c listen_addresses=127.0.0.1 -p $PGPORT -k $PGDATA -c max_connections=200" start >&2

psql_pg() { as_pg "$BIN/psql" -h "$PGDATA" -p "$PGPORT" -U postgres -v ON_ERROR_STOP=1 -qtA "$@"; }
if [ -z "$(psql_pg -c "SELECT 1 FROM pg_roles WHERE rolname='$USER_NAME'")" ]; then
  psql_pg -c "CREATE ROLE $USER_NAME LOGIN PASSWORD '$PASSWORD'" >&2
fi
if [ -z "$(psql_pg -c "SELECT 1 FROM pg_database WHERE datname='$USER_NAME'")" ]; then
  psql_pg -c "CREATE DATABASE $USER_NAME OWNER $USER_NAME" >&2
fi

echo "$URL" > "$PGDATA/url"
echo "$URL"
