// The cashu-ts wallet (@cashu/cashu-ts) paying a Routstr node with NUT-11 P2PK-locked tokens.
//
//   node p2pk.mjs lock <mint_url> <pubkey | P2PKOptions JSON> <sats> [<sats> ...]
//       mints each amount at the mint (quote -> PAID -> proofs) and swaps it into proofs
//       locked to <pubkey> (cashu-ts's P2PK send; a JSON argument is cashu-ts's P2PKOptions,
//       e.g. {"pubkey": ..., "locktime": ..., "refundKeys": [...], "sigFlag": "SIG_ALL"}):
//       one encoded token a line
//   node p2pk.mjs state <mint_url> <token>
//       the mint's state of each proof of <token> (NUT-07), space separated
//   node p2pk.mjs decode <payment_request>
//       a NUT-18 creqA or NUT-26 CREQB request decoded by cashu-ts, as JSON
//   node p2pk.mjs version
import { readFileSync } from "node:fs";
import { Wallet, decodePaymentRequest, getDecodedToken, getEncodedToken } from "@cashu/cashu-ts";

const [cmd, ...args] = process.argv.slice(2);

async function wallet(mintUrl) {
  const w = new Wallet(mintUrl, { unit: "sat" });
  await w.loadMint();
  return w;
}

async function mint(w, sats) {
  const quote = await w.createMintQuoteBolt11(sats);
  const deadline = Date.now() + 10_000;
  let state = quote.state;
  while (state !== "PAID") {  // the test mint's FakeWallet pays at once
    if (Date.now() > deadline) throw new Error(`mint quote ${quote.quote} still ${state}`);
    await new Promise((r) => setTimeout(r, 50));
    state = (await w.checkMintQuoteBolt11(quote.quote)).state;
  }
  return w.mintProofsBolt11(sats, quote.quote);
}

async function lock(mintUrl, lockArg, amounts) {
  const options = lockArg.startsWith("{") ? JSON.parse(lockArg) : { pubkey: lockArg };
  const w = await wallet(mintUrl);
  for (const a of amounts) {
    const sats = Number(a);
    const proofs = await mint(w, sats);
    const { keep, send } = await w.ops.send(sats, proofs).asP2PK(options).run();
    if (keep.length !== 0) throw new Error("kept proofs: the send should spend all");
    console.log(getEncodedToken({ mint: mintUrl, proofs: send, unit: "sat" }));
  }
}

async function state(mintUrl, token) {
  const w = await wallet(mintUrl);
  const states = await w.checkProofsStates(getDecodedToken(token).proofs);
  console.log(states.map((s) => s.state).join(" "));
}

function decode(request) {
  const pr = decodePaymentRequest(request);
  console.log(JSON.stringify({
    id: pr.id ?? null,
    amount: pr.amount ?? null,
    unit: pr.unit ?? null,
    mints: pr.mints ?? null,
    description: pr.description ?? null,
    singleUse: pr.singleUse,
    transport: pr.transport ?? null,
    nut10: pr.nut10 ?? null,
  }));
}

switch (cmd) {
  case "lock":
    await lock(args[0], args[1], args.slice(2));
    break;
  case "state":
    await state(args[0], args[1]);
    break;
  case "decode":
    decode(args[0]);
    break;
  case "version":
    console.log(JSON.parse(readFileSync(
      new URL("./node_modules/@cashu/cashu-ts/package.json", import.meta.url))).version);
    break;
  default:
    console.error(`unknown command: ${cmd}`);
    process.exit(2);
}
