#!/usr/bin/env bash
# Make a development set of compose secrets in ./secrets/: a CA, a server certificate for localhost, 127.0.0.1
# and the compose service name, and one inference and one admin token. For trying `docker compose --profile
# secure up` and the TLS client flags; use your own CA and tokens anywhere else.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p secrets && cd secrets
[ -f ca.pem ] || openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
  -subj "/CN=attnserve dev CA" -keyout ca.key -out ca.pem 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
  -keyout server.key -out server.csr 2>/dev/null
printf "subjectAltName=DNS:localhost,DNS:server-secure,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n" > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 90 -extfile server.ext \
  -out server.pem 2>/dev/null
rm -f server.csr server.ext
[ -f auth.tokens ] || { echo "# inference tokens, one per line"; openssl rand -hex 32; } > auth.tokens
[ -f admin.tokens ] || { echo "# admin tokens, one per line"; openssl rand -hex 32; } > admin.tokens
chmod 600 ./*.key ./*.tokens
chmod 644 server.key  # the server runs as an unprivileged user in its container and must read its key
echo "secrets in $(pwd): ca.pem (give it to clients as --tls-ca), server.pem/.key, auth.tokens, admin.tokens"
