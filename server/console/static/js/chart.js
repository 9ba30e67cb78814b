// Train / validation loss against the step, drawn with the vendored uPlot (a canvas; no inline code).

const { uPlot } = window;

export class LossChart {
  constructor(container) {
    this.container = container;
    this.steps = [];
    this.train = [];
    this.valid = [];
    this.plot = null;
  }

  // One point of either curve; events arrive in step order (a validation loss may share a train step).
  add(step, trainLoss, validLoss) {
    const last = this.steps.length - 1;
    if (last >= 0 && this.steps[last] === step) {
      if (trainLoss !== undefined) this.train[last] = trainLoss;
      if (validLoss !== undefined) this.valid[last] = validLoss;
    } else {
      this.steps.push(step);
      this.train.push(trainLoss ?? null);
      this.valid.push(validLoss ?? null);
    }
    this.container.dataset.points = String(this.train.filter((x) => x !== null).length);
    this.container.dataset.validPoints = String(this.valid.filter((x) => x !== null).length);
    this.render();
  }

  render() {
    const data = [this.steps, this.train, this.valid];
    if (this.plot) { this.plot.setData(data); return; }
    const width = Math.max(320, this.container.clientWidth || 640);
    this.plot = new uPlot({
      width,
      height: 240,
      scales: { x: { time: false } },
      axes: [{ label: 'step' }, { label: 'loss' }],
      series: [
        { label: 'step' },
        { label: 'train loss', stroke: '#2563eb', width: 2, spanGaps: true },
        { label: 'validation loss', stroke: '#dc2626', width: 2, spanGaps: true, points: { show: true, size: 6 } },
      ],
    }, data, this.container);
  }

  destroy() {
    if (this.plot) this.plot.destroy();
    this.plot = null;
    this.container.dataset.points = '0';
    this.container.dataset.validPoints = '0';
  }
}
