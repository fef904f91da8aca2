// The mask editor: a canvas over the image to edit, painted with the mouse (or the keyboard),
// turned into OpenAI's mask on submit: a PNG of the image's size whose transparent pixels mark
// the area to change. The canvas has the image's own pixel size, so the mask needs no scaling.

const PAINT = "rgb(255, 0, 96)";

export class MaskEditor {
  constructor({ canvas, image, cursor, brushSize, tools }) {
    this.canvas = canvas;
    this.image = image;
    this.cursor = cursor;
    this.brushSize = brushSize;
    this.tools = tools;
    this.context = canvas.getContext("2d", { willReadFrequently: true });
    this.keyboard = { x: 0, y: 0 };
    this.last = null;
    canvas.addEventListener("pointerdown", (event) => this.start(event));
    canvas.addEventListener("pointermove", (event) => this.move(event));
    canvas.addEventListener("pointerup", () => { this.last = null; });
    canvas.addEventListener("pointercancel", () => { this.last = null; });
    canvas.addEventListener("keydown", (event) => this.key(event));
    canvas.addEventListener("blur", () => { this.cursor.hidden = true; });
    canvas.addEventListener("focus", () => this.showCursor());
  }

  /** Show `source` (a data URL) as the image to edit; the mask starts empty at its size. */
  async load(source) {
    this.image.src = source;
    await this.image.decode();
    this.canvas.width = this.image.naturalWidth;
    this.canvas.height = this.image.naturalHeight;
    this.keyboard = { x: this.canvas.width / 2, y: this.canvas.height / 2 };
    this.clear();
  }

  get erasing() {
    return this.tools.find((tool) => tool.checked)?.value === "erase";
  }

  /** The brush diameter in image pixels: the slider gives it in screen pixels. */
  get lineWidth() {
    return Number(this.brushSize.value) * this.scale;
  }

  get scale() {
    const shown = this.canvas.getBoundingClientRect().width;
    return shown ? this.canvas.width / shown : 1;
  }

  point(event) {
    const box = this.canvas.getBoundingClientRect();
    return { x: (event.clientX - box.left) * this.scale, y: (event.clientY - box.top) * this.scale };
  }

  start(event) {
    event.preventDefault();
    this.canvas.setPointerCapture(event.pointerId);
    this.canvas.focus({ preventScroll: true });
    this.last = this.point(event);
    this.stroke(this.last, this.last);
  }

  move(event) {
    if (!this.last) return;
    const next = this.point(event);
    this.stroke(this.last, next);
    this.last = next;
  }

  /** Arrow keys move the brush (with Shift they paint on the way), Space or Enter paints where it is. */
  key(event) {
    const step = Math.max(this.lineWidth / 2, 1);
    const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
    const from = { ...this.keyboard };
    if (event.key in moves) {
      const [dx, dy] = moves[event.key];
      this.keyboard.x = Math.min(Math.max(this.keyboard.x + dx, 0), this.canvas.width);
      this.keyboard.y = Math.min(Math.max(this.keyboard.y + dy, 0), this.canvas.height);
      if (event.shiftKey) this.stroke(from, this.keyboard);
    } else if (event.key === " " || event.key === "Enter") {
      this.stroke(from, from);
    } else {
      return;
    }
    event.preventDefault();
    this.showCursor();
  }

  showCursor() {
    const size = Number(this.brushSize.value);
    Object.assign(this.cursor.style, {
      width: `${size}px`, height: `${size}px`,
      left: `${this.keyboard.x / this.scale - size / 2}px`, top: `${this.keyboard.y / this.scale - size / 2}px`,
    });
    this.cursor.hidden = false;
  }

  stroke(from, to) {
    const context = this.context;
    context.globalCompositeOperation = this.erasing ? "destination-out" : "source-over";
    context.strokeStyle = PAINT;
    context.lineWidth = this.lineWidth;
    context.lineCap = "round";
    context.beginPath();
    context.moveTo(from.x, from.y);
    context.lineTo(to.x, to.y);
    context.stroke();
    context.globalCompositeOperation = "source-over";
  }

  clear() {
    this.context.clearRect(0, 0, this.canvas.width, this.canvas.height);
  }

  invert() {
    const painted = document.createElement("canvas");
    painted.width = this.canvas.width;
    painted.height = this.canvas.height;
    painted.getContext("2d").drawImage(this.canvas, 0, 0);
    this.context.fillStyle = PAINT;
    this.context.fillRect(0, 0, this.canvas.width, this.canvas.height);
    this.context.globalCompositeOperation = "destination-out";
    this.context.drawImage(painted, 0, 0);
    this.context.globalCompositeOperation = "source-over";
  }

  get painted() {
    const { data } = this.context.getImageData(0, 0, this.canvas.width, this.canvas.height);
    for (let alpha = 3; alpha < data.length; alpha += 4) if (data[alpha]) return true;
    return false;
  }

  /** OpenAI's mask as a PNG data URL: opaque white where to keep, transparent where painted. */
  toDataURL() {
    const mask = document.createElement("canvas");
    mask.width = this.canvas.width;
    mask.height = this.canvas.height;
    const context = mask.getContext("2d");
    context.fillStyle = "#fff";
    context.fillRect(0, 0, mask.width, mask.height);
    context.globalCompositeOperation = "destination-out";
    context.drawImage(this.canvas, 0, 0);
    return mask.toDataURL("image/png");
  }
}
