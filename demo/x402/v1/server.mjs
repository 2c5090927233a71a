// A paid API speaking x402 v1 through the official `x402-express` middleware.
//   node server.mjs --port 9405 --facilitator http://127.0.0.1:9403
// GET /weather and POST /echo cost $0.01 (10000 USDC units on base-sepolia); GET /free is free.
import express from "express";
import { paymentMiddleware } from "x402-express";

const PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C";

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 && process.argv[i + 1] ? process.argv[i + 1] : fallback;
}

const port = Number(arg("port", "9405"));
const host = arg("host", "127.0.0.1");
if (!["127.0.0.1", "::1", "localhost"].includes(host)) {
  console.error("server.mjs: refusing to listen on a non-loopback address");
  process.exit(2);
}
const facilitator = { url: arg("facilitator", "http://127.0.0.1:9403") };
const paid = (description) => ({
  price: "$0.01",
  network: "base-sepolia",
  config: { description, mimeType: "application/json", maxTimeoutSeconds: 300 },
});

const app = express();
app.use(express.json());
app.use(
  paymentMiddleware(
    PAY_TO,
    { "GET /weather": paid("Weather report"), "POST /echo": paid("Echo a JSON body") },
    facilitator,
  ),
);
app.get("/weather", (_req, res) => res.json({ report: { weather: "sunny", temperature: 21 }, paid: true }));
app.post("/echo", (req, res) => res.json({ echo: req.body, paid: true }));
app.get("/free", (_req, res) => res.json({ free: true }));
app.listen(port, host);
