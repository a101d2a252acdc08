// The npm socket.io-client against the real inference server:
//   node inference.mjs <url> <transports> [apiKey]
// Prompts once, cancels a second prompt mid-stream, prints one JSON object of what it saw.
import { io } from "socket.io-client";

const [url, transportsArg = "polling,websocket", apiKey] = process.argv.slice(2);
const transports = transportsArg.split(",");
const auth = apiKey ? { apiKey } : {};
const socket = io(url, { transports, auth, reconnection: false, timeout: 10000 });

function within(ms, what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timeout: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function call(event, payload) {
  return new Promise((resolve, reject) => {
    socket.timeout(30000).emit(event, payload, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

const events = [];
const finished = new Map();
function record(name) {
  socket.on(name, (data) => {
    events.push([name, data]);
    if (name === "inference_complete" || name === "inference_error") {
      finished.get(data.request_id)?.(data);
    }
  });
}
["inference_queued", "inference_token", "inference_complete", "inference_error"].forEach(record);
const done = (requestId) => new Promise((resolve) => finished.set(requestId, resolve));

const result = {};
try {
  await within(10000, "connect", new Promise((resolve, reject) => {
    socket.once("connect", resolve);
    socket.once("connect_error", reject);
  }));
  const first = done("js-1");
  result.ack = await call("inference_prompt", { prompt: "Once upon a time", max_tokens: 10, temperature: 0, request_id: "js-1" });
  result.complete = await within(60000, "complete", first);
  result.tokens = events.filter(([n, d]) => n === "inference_token" && d.request_id === "js-1").map(([, d]) => d.text);

  const second = done("js-2");
  const firstToken = new Promise((resolve) => socket.on("inference_token", (d) => d.request_id === "js-2" && resolve()));
  await call("inference_prompt", { prompt: "Once upon a time", max_tokens: 400, request_id: "js-2" });
  await within(60000, "first token", firstToken);
  result.cancelAck = await call("inference_cancel", { request_id: "js-2" });
  result.cancelled = await within(10000, "cancelled", second);
  result.transport = socket.io.engine.transport.name;
  socket.disconnect();
  console.log(JSON.stringify(result));
  process.exit(0);
} catch (error) {
  console.error(String(error?.stack ?? error));
  console.log(JSON.stringify(result));
  process.exit(1);
}
