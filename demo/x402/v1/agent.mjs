// An agent that holds its own wallet and pays x402 v1 with the official `x402-fetch`.
//   PAG0_AGENT_KEY=0x<64 hex> node agent.mjs URL [--method POST] [--body JSON] [--header k:v]...
// Prints one JSON line: status, the x-pag0-* headers, the settlement and the body.
import { wrapFetchWithPayment, createSigner, decodeXPaymentResponse } from "x402-fetch";

const [url, ...rest] = process.argv.slice(2);
const headers = {};
let method = "GET";
let body;
for (let i = 0; i < rest.length; i += 2) {
  const [flag, value] = [rest[i], rest[i + 1]];
  if (flag === "--method") method = value;
  else if (flag === "--body") body = value;
  else if (flag === "--header") {
    const at = value.indexOf(":");
    headers[value.slice(0, at).trim()] = value.slice(at + 1).trim();
  }
}
if (body !== undefined) headers["content-type"] = "application/json";

const signer = await createSigner("base-sepolia", process.env.PAG0_AGENT_KEY);
const pay = wrapFetchWithPayment(fetch, signer);
try {
  const res = await pay(url, { method, headers, body });
  const own = {};
  res.headers.forEach((v, k) => {
    if (k.startsWith("x-pag0-")) own[k] = v;
  });
  const settlement = res.headers.get("x-payment-response");
  const text = await res.text();
  console.log(
    JSON.stringify({
      status: res.status,
      headers: own,
      settlement: settlement ? decodeXPaymentResponse(settlement) : null,
      body: text,
    }),
  );
} catch (e) {
  console.log(JSON.stringify({ error: String(e && e.message ? e.message : e) }));
}
