// Talking to the server: the API key, JSON over HTTP, multipart variations, the progress WebSocket
// and async jobs (submitted with `Prefer: respond-async`, followed through their SSE events).
// Every failure becomes an ApiError carrying the server's OpenAI error envelope, so the page can
// show its message next to the field its `param` names.

const KEY_STORAGE = "diffuser-api.playground.api-key";
// The prefix OpenAI's Realtime API uses for the same reason: browsers cannot set headers on a WebSocket.
const KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key.";
// The server echoes the first subprotocol that is not the key; browsers drop a socket whose answer names none.
const SESSION_SUBPROTOCOL = "diffuser-api";

export class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `the server answered ${status}`);
    this.status = status;
    this.param = error.param || null;
    this.code = error.code || null;
    this.requestId = error.request_id || null;
  }
}

export const apiKey = {
  get: () => localStorage.getItem(KEY_STORAGE) || "",
  set(value) {
    if (value) localStorage.setItem(KEY_STORAGE, value);
    else localStorage.removeItem(KEY_STORAGE);
  },
};

export class Api {
  constructor(document) {
    // Relative to the page, so the playground also works behind a proxy that adds a path prefix.
    this.root = new URL(".", document.location.href);
    this.prefix = document.documentElement.dataset.apiPrefix.replace(/^\/+|\/+$/g, "");
  }

  url(path) {
    return new URL(`${this.prefix}/${path}`, this.root);
  }

  headers() {
    const key = apiKey.get();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  async getJSON(url) {
    return answer(await fetch(url, { headers: this.headers() }));
  }

  /** `GET /v1/models` for the list and statuses, `GET /` for what each model can do. */
  async models() {
    const [listing, info] = await Promise.all([this.getJSON(this.url("models")), this.getJSON(this.root)]);
    const described = new Map(info.models.map((model) => [model.id, model]));
    return listing.data.map((card) => ({ ...described.get(card.id), ...card }));
  }

  async variations(form) {
    return answer(await fetch(this.url("images/variations"), { method: "POST", headers: this.headers(), body: form }));
  }

  /** `GET /v1/models/{id}`: its `adapters` (LoRAs) when the server has any for it. */
  async model(id) {
    return this.getJSON(this.url(`models/${encodeURIComponent(id)}`));
  }

  /** Submit as an async job: `endpoint` is generations, edits or variations; `body` JSON or a FormData. */
  async submitJob(endpoint, body) {
    const json = !(body instanceof FormData);
    const headers = { ...this.headers(), Prefer: "respond-async", ...(json ? { "Content-Type": "application/json" } : {}) };
    return answer(await fetch(this.url(`images/${endpoint}`), {
      method: "POST", headers, body: json ? JSON.stringify(body) : body,
    }));
  }

  async cancelJob(id) {
    return answer(await fetch(this.url(`images/jobs/${encodeURIComponent(id)}/cancel`), {
      method: "POST", headers: this.headers(),
    }));
  }

  /**
   * Follow `GET /v1/images/jobs/{id}/events` until the job ends; resolves with the final job.
   * Read with fetch rather than EventSource, which cannot send the Authorization header.
   * `signal` aborting only stops watching: the job runs on.
   */
  async followJob(id, onEvent, signal) {
    const response = await fetch(this.url(`images/jobs/${encodeURIComponent(id)}/events`), {
      headers: { ...this.headers(), Accept: "text/event-stream" }, signal,
    });
    if (!response.ok) await answer(response);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) throw new ApiError(0, { message: "The job's events stopped before it ended: reload to re-attach." });
      buffer += value.replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = parseEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (!event) continue;
        if (event.name === "error") throw new ApiError(0, event.data.error ?? {});
        if (FINAL_JOB_EVENTS.has(event.name)) return event.data.job;
        onEvent(event.data);
      }
    }
  }

  /**
   * One generation or edit over `WS /v1/images/ws`; `onMessage` sees every message but `done`
   * and `error`. Resolves when the server says done, rejects with an ApiError otherwise.
   * `signal` aborting closes the socket, which cancels the work on the server.
   */
  stream(body, onMessage, signal) {
    return new Promise((resolve, reject) => {
      const socket = this.openSocket();
      let settled = false;
      const finish = (error) => {
        if (settled) return;
        settled = true;
        signal.removeEventListener("abort", abort);
        if (error) reject(error);
        else resolve();
      };
      const abort = () => {
        socket.close(1000);
        finish(new ApiError(0, { message: "Cancelled: the server stops the work." }));
      };
      signal.addEventListener("abort", abort);
      socket.addEventListener("open", () => socket.send(JSON.stringify(body)));
      socket.addEventListener("message", (event) => {
        const message = JSON.parse(event.data);
        if (message.type === "done") finish();
        else if (message.type === "error") finish(new ApiError(0, message.error));
        else onMessage(message);
      });
      socket.addEventListener("close", (event) => finish(new ApiError(0, {
        // The handshake's answer (a 401 or 403 envelope) is not visible to page scripts.
        message: `The connection closed before the work was done (code ${event.code}): ` +
          "the server refused it (check the API key) or could not be reached.",
      })));
    });
  }

  openSocket() {
    const url = this.url("images/ws");
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    const key = apiKey.get();
    if (!key) return new WebSocket(url, [SESSION_SUBPROTOCOL]);
    try {
      return new WebSocket(url, [SESSION_SUBPROTOCOL, KEY_SUBPROTOCOL_PREFIX + key]);
    } catch {
      // A key with characters a subprotocol may not hold goes in the query instead.
      url.searchParams.set("api_key", key);
      return new WebSocket(url, [SESSION_SUBPROTOCOL]);
    }
  }
}

const FINAL_JOB_EVENTS = new Set(["image.job.completed", "image.job.failed", "image.job.cancelled"]);

/** One server-sent event's text: its name and parsed data, or null for a comment (a ping). */
function parseEvent(text) {
  let name = "message";
  const data = [];
  for (const line of text.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  return data.length ? { name, data: JSON.parse(data.join("\n")) } : null;
}

async function answer(response) {
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    throw new ApiError(response.status, body?.error ?? { message: `the server answered ${response.status}` });
  }
  return body;
}
