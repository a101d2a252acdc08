// The npm socket.io-client against our server: node client.mjs <url> <transports>
// Prints one JSON object with what the client saw; exits non-zero on any failure.
import { io } from "socket.io-client";

const [url, transportsArg = "polling,websocket"] = process.argv.slice(2);
const transports = transportsArg.split(",");
const options = { transports, auth: { token: "123" }, reconnection: false, timeout: 5000 };

function within(ms, what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timeout: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function next(socket, event) {
  return new Promise((resolve) => socket.once(event, (...args) => resolve(args)));
}

function ack(socket, event, ...args) {
  return new Promise((resolve, reject) => {
    socket.timeout(5000).emit(event, ...args, (err, ...reply) => (err ? reject(err) : resolve(reply)));
  });
}

const plain = (value) =>
  value instanceof Uint8Array || Buffer.isBuffer(value) ? { bytes: Array.from(value) } : value;

const main = io(url, options);
const custom = io(`${url}/custom`, options);
const result = {};
try {
  [result.auth] = await within(5000, "auth", next(main, "auth"));
  [result.customAuth] = await within(5000, "custom auth", next(custom, "auth"));
  result.ack = await ack(main, "message-with-ack", 1, "2", { 3: [true] });
  result.binaryAck = (await ack(main, "message-with-ack", new Uint8Array([1, 2, 3]), "x")).map(plain);

  const back = [];
  const all = new Promise((resolve) =>
    main.on("message-back", (...args) => {
      back.push(args.map(plain));
      if (back.length === 51) resolve();
    }),
  );
  main.emit("message", new Uint8Array([4, 5]), { k: "v" });
  for (let i = 0; i < 50; i++) main.emit("message", i);
  await within(10000, "message-back burst", all);
  result.back = back;

  if (transports.includes("websocket")) {
    const engine = main.io.engine;
    if (engine.transport.name !== "websocket") {
      await within(5000, "upgrade", new Promise((resolve) => engine.once("upgrade", resolve)));
    }
  }
  result.transport = main.io.engine.transport.name;
  custom.disconnect();
  main.disconnect();
  result.connected = main.connected || custom.connected;
  console.log(JSON.stringify(result));
  process.exit(0);
} catch (error) {
  console.error(String(error?.stack ?? error));
  console.log(JSON.stringify(result));
  process.exit(1);
}
