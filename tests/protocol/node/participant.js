// A saga participant in JavaScript, written from docs/protocol.md alone (no code of the saga
// project): it serves "<name>.reserve" and its compensation "<name>.release".
//
//   node participant.js AMQP_URL PREFIX NAME LEDGER_FILE
//
// A reservation of {"units": n} succeeds when n <= 100 and fails for good ("too_many")
// otherwise. Final answers and tombstones go to a JSON-lines ledger, fsync'ed before the reply
// is published and the command acked, so a restart answers every key as before.
"use strict";

const amqp = require("amqplib");
const crypto = require("crypto");
const fs = require("fs");

const [url, prefix, name, ledgerPath] = process.argv.slice(2);
// FLAWS=no-tombstone makes it apply a late action: for a test that the conformance kit fails it
const flaws = new Set((process.env.FLAWS || "").split(",").filter(Boolean));
const NAMESPACE = "6f1c6f0e-5a3b-4d8e-9c39-2f1f0b3a7d42";
const MAX_BYTES = 256 * 1024;
const queue = `${prefix}.cmd.${name}`;
const replyQueue = `${prefix}.replies`;
const dlx = `${prefix}.dlx`;

function uuid5(namespace, text) {
  const ns = Buffer.from(namespace.replace(/-/g, ""), "hex");
  const hash = crypto.createHash("sha1").update(Buffer.concat([ns, Buffer.from(text, "utf8")])).digest();
  const b = hash.subarray(0, 16);
  b[6] = (b[6] & 0x0f) | 0x50;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = b.toString("hex");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

// --- the ledger: key -> final answer, plus tombstones ------------------------------------
const finals = new Map();
const tombstones = new Set();
if (fs.existsSync(ledgerPath)) {
  for (const line of fs.readFileSync(ledgerPath, "utf8").split("\n")) {
    if (!line) continue;
    const row = JSON.parse(line);
    if (row.tombstone) tombstones.add(row.key);
    else finals.set(row.key, row.answer);
  }
}
const ledger = fs.openSync(ledgerPath, "a");
function record(rows) {
  fs.writeSync(ledger, rows.map((r) => JSON.stringify(r) + "\n").join(""));
  fs.fsyncSync(ledger);
}

// --- the envelope ----------------------------------------------------------------------------
const FIELDS = {
  schema_version: "number", message_id: "string", idempotency_key: "string", saga_id: "string",
  saga_name: "string", step: "string", direction: "string", attempt: "number",
  participant: "string", command_type: "string", reply_to: "string", deadline: "string",
  payload: "object",
};
function envelopeProblem(c) {
  if (c === null || typeof c !== "object" || Array.isArray(c)) return "not a JSON object";
  for (const [field, type] of Object.entries(FIELDS)) {
    if (typeof c[field] !== type || c[field] === null) return `${field}: missing or not a ${type}`;
  }
  for (const field of Object.keys(c)) if (!(field in FIELDS)) return `${field}: unknown field`;
  if (c.schema_version !== 1) return "schema_version: must be 1";
  if (!["action", "compensation"].includes(c.direction)) return "direction: action or compensation";
  return null;
}

function jsonContentType(value) {
  if (value === undefined || value === null) return true;
  const [media, ...params] = value.split(";").map((p) => p.trim().toLowerCase());
  return media === "application/json" && params.every((p) => p.replace(/\s/g, "") === "charset=utf-8");
}

function answer(command) {
  if (command.direction === "compensation") return { outcome: "success", data: { nothing_to_undo: !finals.has(actionKey(command)) } };
  const units = command.payload.units;
  if (!Number.isInteger(units) || units < 1) return { outcome: "failure", reason: "invalid_payload", detail: "units: a positive integer" };
  if (units > 100) return { outcome: "failure", reason: "too_many", detail: `${units} units, at most 100` };
  return { outcome: "success", data: { reserved: units } };
}

function actionKey(command) {
  return uuid5(NAMESPACE, `idem:${command.saga_id}:${command.step}:action`);
}

async function main() {
  const connection = await amqp.connect(url);
  const channel = await connection.createConfirmChannel();
  // exactly as protocol.md's tables say (classic queues)
  await channel.assertExchange(`${prefix}.commands`, "direct", { durable: true, autoDelete: false, internal: false });
  await channel.assertExchange(dlx, "direct", { durable: true, autoDelete: false, internal: false });
  for (const q of [queue, replyQueue, `${prefix}.start`]) {
    await channel.assertQueue(q, { durable: true, exclusive: false, autoDelete: false, arguments: { "x-dead-letter-exchange": dlx, "x-dead-letter-routing-key": `${q}.dlq` } });
    await channel.assertQueue(`${q}.dlq`, { durable: true, exclusive: false, autoDelete: false });
    await channel.bindQueue(`${q}.dlq`, dlx, `${q}.dlq`);
  }
  await channel.bindQueue(queue, `${prefix}.commands`, name);
  await channel.prefetch(16);

  function deadLetter(msg, reason, detail) {
    const headers = { ...(msg.properties.headers || {}), "x-saga-dead-letter-reason": reason, "x-saga-dead-letter-detail": detail.slice(0, 1000), "x-saga-dead-letter-queue": queue };
    channel.publish(dlx, `${queue}.dlq`, msg.content, { ...msg.properties, headers, persistent: true }, (err) => {
      if (err) channel.nack(msg, false, true);
      else channel.ack(msg);
    });
  }

  await channel.consume(queue, (msg) => {
    if (msg === null) return;
    if (msg.content.length > MAX_BYTES) return deadLetter(msg, "too_large", `message is ${msg.content.length} bytes`);
    if (!jsonContentType(msg.properties.contentType)) return deadLetter(msg, "wrong_content_type", String(msg.properties.contentType));
    let command;
    try {
      command = JSON.parse(msg.content.toString("utf8"));
    } catch (e) {
      return deadLetter(msg, "invalid_json", e.message);
    }
    const problem = envelopeProblem(command);
    if (problem) return deadLetter(msg, "schema_violation", problem);
    if (command.participant !== name || ![`${name}.reserve`, `${name}.release`].includes(command.command_type)) {
      return deadLetter(msg, "unknown_command", `${name} does not handle ${command.command_type}`);
    }
    if (command.reply_to !== replyQueue) return deadLetter(msg, "unknown_reply_to", `reply_to ${command.reply_to}`);

    const key = command.idempotency_key;
    let result = finals.get(key);
    if (result === undefined) {
      const rows = [];
      if (command.direction === "action" && tombstones.has(key) && !flaws.has("no-tombstone")) {
        result = { outcome: "failure", reason: "already_compensated", detail: "its compensation came first" };
      } else {
        result = answer(command);
      }
      const final = result.outcome === "success" || !result.retryable;
      if (final) {
        rows.push({ key, answer: result });
        if (command.direction === "compensation" && !finals.has(actionKey(command)) && !tombstones.has(actionKey(command))) {
          rows.push({ key: actionKey(command), tombstone: true });
          tombstones.add(actionKey(command));
        }
        record(rows);
        finals.set(key, result);
      }
    }
    const reply = {
      schema_version: 1,
      message_id: uuid5(command.message_id, "reply"),
      causation_id: command.message_id,
      saga_id: command.saga_id,
      participant: name,
      command_type: command.command_type,
      outcome: result.outcome,
      reason: result.reason ?? null,
      detail: result.detail ?? null,
      retryable: result.retryable ?? false,
      data: result.data ?? {},
    };
    channel.publish("", command.reply_to, Buffer.from(JSON.stringify(reply)), {
      persistent: true,
      mandatory: true,
      messageId: reply.message_id,
      correlationId: command.saga_id,
      type: `${command.command_type}.reply`,
      contentType: "application/json",
      headers: msg.properties.headers && msg.properties.headers.traceparent ? { traceparent: msg.properties.headers.traceparent } : {},
    }, (err) => {
      if (err) channel.nack(msg, false, true);
      else channel.ack(msg);
    });
  }, { noAck: false });
  console.log(`participant ${name} ready on ${queue}`);
  const stop = async () => {
    try { await channel.close(); await connection.close(); } finally { process.exit(0); }
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((err) => {
  console.error(`error: ${err.message}`);
  process.exit(2);
});
