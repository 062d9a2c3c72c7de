#!/usr/bin/env node
// A gRPC client that is not ours: @grpc/grpc-js with the .proto loaded at run
// time by @grpc/proto-loader, the way a Node platform service would call the
// daemon. It drives one fresh connection through its whole lifecycle and
// checks every answer against the contract in proto/ and docs/.
//
//     node client.js 127.0.0.1:50051
//     node client.js 127.0.0.1:50051 --ca ca.crt --token-file token
//
// With --ca it speaks TLS (grpc.credentials.createSsl, trusting that CA), and
// with --token-file it sends "authorization: Bearer <token>" as call metadata
// on every call, after checking that a call without it is UNAUTHENTICATED.
//
// Exit codes: 0 every check passed, 1 a check failed (one line on stderr
// saying which), 2 usage error.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const crypto = require("node:crypto");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "proto");
const PROTO_FILE = "orchestrator/v1/orchestrator.proto";
const DEADLINE_MS = 15_000;

class Mismatch extends Error {}

function check(condition, message) {
  if (!condition) throw new Mismatch(message);
}

// JSON that also prints BigInt (int64 values compared exactly).
function show(value) {
  return JSON.stringify(value, (_, v) => (typeof v === "bigint" ? v.toString() : v));
}

function equal(actual, expected, what) {
  check(actual === expected, `${what}: expected ${show(expected)}, got ${show(actual)}`);
}

function loadService() {
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as written in the .proto (connection_id, not connectionId)
    longs: String, // int64 arrives as a decimal string: no precision loss
    enums: String, // enum values by name, e.g. CONNECTION_STATE_PENDING
    defaults: true, // unset scalars as their zero value, as every proto3 client sees them
    oneofs: true,
  });
  const pkg = grpc.loadPackageDefinition(definition);
  return pkg.orchestrator.v1.Orchestrator;
}

function deadline() {
  return new Date(Date.now() + DEADLINE_MS);
}

// The call metadata of every call: the bearer token, when there is one.
let METADATA = new grpc.Metadata();

function unary(client, method, request, metadata = METADATA) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: deadline() }, (error, response) => {
      if (error) reject(error);
      else resolve(response);
    });
  });
}

function readAll(client, request) {
  return new Promise((resolve, reject) => {
    const records = [];
    const call = client.ReadEvents(request, METADATA, { deadline: deadline() });
    call.on("data", (record) => records.push(record));
    call.on("error", reject);
    call.on("end", () => resolve(records));
  });
}

async function expectStatus(promise, code, what) {
  let response;
  try {
    response = await promise;
  } catch (error) {
    const name = grpc.status[error.code] ?? String(error.code);
    check(error.code === code, `${what}: expected status ${grpc.status[code]}, got ${name}: ${error.details}`);
    check(
      typeof error.details === "string" && error.details.length > 0 && !error.details.includes("Traceback"),
      `${what}: expected a one-line error message, got ${JSON.stringify(error.details)}`,
    );
    return error;
  }
  throw new Mismatch(`${what}: expected status ${grpc.status[code]}, got a response ${show(response)}`);
}

function struct(object) {
  const fields = {};
  for (const [key, value] of Object.entries(object)) fields[key] = { stringValue: String(value) };
  return { fields };
}

function asInt(value, what) {
  check(typeof value === "string" && /^-?\d+$/.test(value), `${what}: expected an int64, got ${JSON.stringify(value)}`);
  return BigInt(value);
}

async function run(address, { ca, tokenFile }) {
  const Orchestrator = loadService();
  const credentials = ca ? grpc.credentials.createSsl(fs.readFileSync(ca)) : grpc.credentials.createInsecure();
  const client = new Orchestrator(address, credentials);
  try {
    await new Promise((resolve, reject) =>
      client.waitForReady(deadline(), (error) => (error ? reject(error) : resolve())),
    );
    if (tokenFile) {
      const error = await expectStatus(
        unary(client, "ListConnections", {}, new grpc.Metadata()),
        grpc.status.UNAUTHENTICATED,
        "ListConnections without a token",
      );
      equal(error.details, "missing or invalid bearer token", "UNAUTHENTICATED details");
      METADATA = new grpc.Metadata();
      METADATA.add("authorization", `Bearer ${fs.readFileSync(tokenFile, "utf8").trim()}`);
    }
    await lifecycle(client);
  } finally {
    client.close();
  }
}

async function lifecycle(client) {
  const ref = {
    environment: "dev",
    integration: "interop",
    connection_id: `node-${crypto.randomUUID()}`,
  };
  const stream = `${ref.environment}/${ref.integration}/${ref.connection_id}`;
  const SECRET = `secret-${crypto.randomUUID()}`;

  // A zero (UNSPECIFIED) event is refused, and nothing is written for it.
  await expectStatus(
    unary(client, "EmitLifecycleEvent", { connection: ref, event: "LIFECYCLE_EVENT_UNSPECIFIED" }),
    grpc.status.INVALID_ARGUMENT,
    "EmitLifecycleEvent with LIFECYCLE_EVENT_UNSPECIFIED",
  );
  await expectStatus(
    unary(client, "GetConnection", { connection: ref }),
    grpc.status.NOT_FOUND,
    "GetConnection after a refused event",
  );

  const steps = [
    ["LIFECYCLE_EVENT_VALIDATE_CONNECTION", "validate-connection", "CONNECTION_STATE_PENDING"],
    ["LIFECYCLE_EVENT_POST_CONNECTION_CREATION", "post-connection-creation", "CONNECTION_STATE_ACTIVE"],
    ["LIFECYCLE_EVENT_PRE_CONNECTION_DELETION", "pre-connection-deletion", "CONNECTION_STATE_DELETED"],
  ];
  const emitted = [];
  let lastPosition = 0n;
  let lastVersion = 0n;
  for (const [event, type, state] of steps) {
    const response = await unary(client, "EmitLifecycleEvent", {
      connection: ref,
      event,
      connection_config: struct({ instance_url: "acme.example.test" }),
      payload: struct({ from: "interop" }),
      credentials: { access_token: SECRET },
      idempotency_key: `${type}-1`,
    });
    const position = asInt(response.position, `${type} position`);
    const version = asInt(response.version, `${type} version`);
    equal(response.state, state, `${type} state`);
    check(position > lastPosition, `${type} position ${position} not after the previous ${lastPosition}`);
    check(version > lastVersion, `${type} version ${version} not after the previous ${lastVersion}`);
    check(/^[0-9a-f-]{36}$/.test(response.event_id), `${type} event_id is not a UUID: ${response.event_id}`);
    equal(response.deduplicated, false, `${type} deduplicated`);
    equal(response.rejection_reason, "", `${type} rejection_reason`);
    emitted.push({ type, event_id: response.event_id, position, version });
    lastPosition = position;
    lastVersion = version;
  }
  // A response's version is the stream's after the call: the validation's record, the
  // credentials-updated its credentials brought (sealed: the connection is pending), its verdict.
  equal(emitted[0].version, 3n, "the first event's version");

  // The same request with the same idempotency key answers the original response.
  const repeat = await unary(client, "EmitLifecycleEvent", {
    connection: ref,
    event: "LIFECYCLE_EVENT_PRE_CONNECTION_DELETION",
    connection_config: struct({ instance_url: "acme.example.test" }),
    payload: struct({ from: "interop" }),
    credentials: { access_token: SECRET },
    idempotency_key: "pre-connection-deletion-1",
  });
  equal(repeat.event_id, emitted[2].event_id, "repeated deletion event_id");
  equal(repeat.deduplicated, true, "repeated deletion deduplicated");

  const got = await unary(client, "GetConnection", { connection: ref });
  const connection = got.connection;
  check(connection, "GetConnection: the response has no connection");
  equal(connection.ref.environment, ref.environment, "GetConnection ref.environment");
  equal(connection.ref.integration, ref.integration, "GetConnection ref.integration");
  equal(connection.ref.connection_id, ref.connection_id, "GetConnection ref.connection_id");
  equal(connection.state, "CONNECTION_STATE_DELETED", "GetConnection state");
  check(
    asInt(connection.version, "GetConnection version") >= lastVersion,
    `GetConnection version ${connection.version} is before the last emitted version ${lastVersion}`,
  );
  check(
    asInt(connection.last_position, "GetConnection last_position") >= lastPosition,
    `GetConnection last_position ${connection.last_position} is before the last emitted position ${lastPosition}`,
  );

  const listed = [];
  let page_token = "";
  do {
    const page = await unary(client, "ListConnections", {
      environment: ref.environment,
      integration: ref.integration,
      page_size: 100,
      page_token,
    });
    listed.push(...page.connections);
    page_token = page.next_page_token;
  } while (page_token);
  const ours = listed.filter((c) => c.ref.connection_id === ref.connection_id);
  equal(ours.length, 1, "ListConnections: times our connection is listed");
  equal(ours[0].state, "CONNECTION_STATE_DELETED", "ListConnections state");
  for (const c of listed) {
    equal(c.ref.integration, ref.integration, "ListConnections integration filter");
  }
  const active = await unary(client, "ListConnections", {
    integration: ref.integration,
    state: "CONNECTION_STATE_ACTIVE",
    page_size: 1000,
  });
  check(
    !active.connections.some((c) => c.ref.connection_id === ref.connection_id),
    "ListConnections state=ACTIVE lists our deleted connection",
  );

  const records = await readAll(client, { connection: ref, from_position: 0, follow: false });
  check(records.length >= steps.length, `ReadEvents: expected at least ${steps.length} records, got ${records.length}`);
  let previous = 0n;
  records.forEach((record, index) => {
    const position = asInt(record.position, `record ${index} position`);
    check(position > previous, `ReadEvents: position ${position} does not increase (previous ${previous})`);
    previous = position;
    equal(asInt(record.version, `record ${index} version`), BigInt(index + 1), `ReadEvents record ${index} version`);
    equal(record.stream, stream, `ReadEvents record ${index} stream`);
    equal(record.connection.connection_id, ref.connection_id, `ReadEvents record ${index} connection_id`);
    check(record.recorded_at && record.recorded_at.seconds, `ReadEvents record ${index} has no recorded_at`);
  });
  for (const e of emitted) {
    const record = records.find((r) => r.event_id === e.event_id);
    check(record, `ReadEvents: the ${e.type} record ${e.event_id} is missing`);
    equal(record.type, e.type, `ReadEvents type of ${e.event_id}`);
    equal(asInt(record.position, "position"), e.position, `ReadEvents position of ${e.type}`);
    check(asInt(record.version, "version") <= e.version, `ReadEvents version of ${e.type} is after the response's`);
    equal(record.idempotency_key, `${e.type}-1`, `ReadEvents idempotency_key of ${e.type}`);
  }

  check(!JSON.stringify(records).includes(SECRET), "ReadEvents: a credential value is in the event log");

  // from_position is inclusive.
  const tail = await readAll(client, { connection: ref, from_position: String(emitted[1].position), follow: false });
  check(tail.length > 0, "ReadEvents from the creation's position returned nothing");
  equal(tail[0].event_id, emitted[1].event_id, "ReadEvents from_position is inclusive: first record");

  process.stdout.write(`interop: ok (${stream}, ${records.length} records, last position ${previous})\n`);
}

function parse(argv) {
  const [address, ...rest] = argv;
  const options = {};
  for (let i = 0; i < rest.length; i += 2) {
    const value = rest[i + 1];
    if (rest[i] === "--ca" && value) options.ca = value;
    else if (rest[i] === "--token-file" && value) options.tokenFile = value;
    else return null;
  }
  return address && !address.startsWith("-") ? { address, options } : null;
}

async function main(argv) {
  const parsed = parse(argv);
  if (parsed === null) {
    process.stderr.write("usage: node client.js HOST:PORT [--ca FILE] [--token-file FILE]\n");
    return 2;
  }
  try {
    await run(parsed.address, parsed.options);
    return 0;
  } catch (error) {
    const message = error instanceof Mismatch ? error.message : `${error.code ? grpc.status[error.code] + ": " : ""}${error.details ?? error.message}`;
    process.stderr.write(`interop: FAILED: ${message}\n`);
    return 1;
  }
}

main(process.argv.slice(2)).then((code) => {
  process.exitCode = code;
});
