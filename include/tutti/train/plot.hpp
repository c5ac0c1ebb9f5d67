// Line charts of training curves as SVG, written by the program itself (no plotting package):
// several series per chart, axes with ticks and labels, a legend, charts stacked vertically in
// one document. plot_run() draws a run directory's metrics.jsonl; the sweep draws its trials.
#pragma once
#include <string>
#include <vector>

namespace tutti::train {

struct Series {
  std::string name;
  std::vector<double> x, y;  // same length; a non-finite y is a gap in the line
  bool markers = false;      // a dot at every point (sparse series, such as evaluations)
  bool end_marker = false;   // a cross at the last point (a trial stopped early)
};

struct Chart {
  std::string title, x_label, y_label;
  std::vector<Series> series;
};

// The charts stacked top to bottom in one SVG document, each `chart_height` pixels high and
// `width` wide, wider when the legend needs it; a series of more than 2000 points is thinned to
// every k-th point (its last point kept).
std::string render_svg(const std::vector<Chart>& charts, int width = 900, int chart_height = 320);

// render_svg(charts) written to `path` atomically (a temporary file renamed over it), so a reader
// never sees half a plot.
void write_svg(const std::string& path, const std::vector<Chart>& charts);

// The curves of the run in `run_dir`, from <run_dir>/metrics.jsonl, written to <run_dir>/plot.svg:
//   1. loss: the training loss of every step, the train and validation loss of every evaluation;
//   2. throughput: tokens/s of every step (batch x context of <run_dir>/run.toml over the step's
//      "ms"); ms per step instead when run.toml cannot be read.
// Lines that do not parse (a torn last line of a killed run) and keys other than these are
// skipped. Throws tutti::Error when metrics.jsonl cannot be opened or plot.svg cannot be written.
// Returns the path of plot.svg.
std::string plot_run(const std::string& run_dir);

}  // namespace tutti::train
