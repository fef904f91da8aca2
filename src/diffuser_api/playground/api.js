// Talking to the server: the API key, JSON over HTTP, multipart variations and the progress WebSocket.
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

async function answer(response) {
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    throw new ApiError(response.status, body?.error ?? { message: `the server answered ${response.status}` });
  }
  return body;
}
