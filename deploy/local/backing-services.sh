#!/usr/bin/env bash
# Makes sure PostgreSQL, Redis and RabbitMQ are installed and running on
# 127.0.0.1 with their default ports: starts them when installed but stopped,
# apt-installs them when missing. Idempotent; safe to run before every command.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

log() { printf '[backing-services] %s\n' "$*" >&2; }

APT_UPDATED=0
apt_install() {
  if [ "$APT_UPDATED" -eq 0 ]; then
    log "apt-get update"
    $SUDO apt-get update -qq
    APT_UPDATED=1
  fi
  log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # name, seconds, command...
  local name=$1 seconds=$2; shift 2
  for _ in $(seq "$seconds"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  log "$name did not come up within ${seconds}s"
  return 1
}

# --- PostgreSQL (trust auth on 127.0.0.1, as the code's default URLs expect) ---
if ! command -v pg_lsclusters >/dev/null 2>&1; then
  apt_install postgresql postgresql-client
  # A fresh Debian cluster asks for passwords on TCP; this is a local dev/CI
  # database, so trust loopback connections like the machines we run on do.
  for hba in /etc/postgresql/*/main/pg_hba.conf; do
    $SUDO sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  done
fi
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  log "starting PostgreSQL"
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_for PostgreSQL 60 pg_isready -q -h 127.0.0.1 -p 5432
fi

# --- Redis (no persistence: it is a cache of admission state) ---
if ! command -v redis-server >/dev/null 2>&1; then
  apt_install redis-server
fi
if ! port_open 6379; then
  log "starting Redis"
  $SUDO mkdir -p /var/lib/redis /var/log/redis
  $SUDO redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for Redis 30 redis-cli -h 127.0.0.1 -p 6379 ping
fi

# --- RabbitMQ (guest/guest, which RabbitMQ allows from loopback only) ---
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  apt_install rabbitmq-server
fi
if ! port_open 5672; then
  log "starting RabbitMQ"
  $SUDO rabbitmq-server -detached
  wait_for RabbitMQ 120 port_open 5672
fi

log "PostgreSQL :5432, Redis :6379, RabbitMQ :5672 are up"
