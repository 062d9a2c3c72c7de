#!/usr/bin/env bash
# The README's five-minute tour, as a script: prints each command and its output.
# Run it with the fake provider and the daemon running (see the README), from any directory:
#   python examples/fake_provider.py &
#   ORCHESTRATOR_CONFIG=examples/orchestrator.toml orchestrator serve &
#   examples/tour.sh
set -u
run() {
  printf '$ %s\n' "$*"
  eval "$@"
  printf '\n'
}
run orchestrator functions
run orchestrator emit validate-connection octo -i github --credential access_token=ghp_narrow
run orchestrator emit validate-connection octo -i github --credential access_token=ghp_full_scope
run orchestrator emit post-connection-creation acme-1 -i salesforce --connection-config "'{\"instance\": \"acme\"}'" \
  --credential access_token=00Dxx --idempotency-key create-acme-1 --wait
run orchestrator emit post-connection-creation acme-2 -i salesforce --connection-config "'{\"instance\": \"acme\"}'" \
  --credential access_token=00Dyy --wait '>/dev/null'
run orchestrator connections
run orchestrator connections get acme-1 -i salesforce
run orchestrator credentials set acme-2 -i salesforce --credential access_token=00Dzz
run orchestrator dryrun delete-webhook acme-2 -e dev --credential access_token=00Dyy --yes
run orchestrator emit pre-connection-deletion acme-1 -i salesforce
run orchestrator events --connection acme-1
run orchestrator replay --until 7
run orchestrator replay --connection acme-1
run orchestrator replay --verify
run orchestrator emit post-connection-creation acme-1 -i salesforce --connection-config "'{\"instance\": \"acme\"}'" \
  --idempotency-key create-acme-1
run 'orchestrator emit pre-connection-deletion ghost -i salesforce; echo "(exit code $?)"'
