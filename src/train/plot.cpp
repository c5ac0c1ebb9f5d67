#include "tutti/train/plot.hpp"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "tutti/core/error.hpp"
#include "tutti/train/config.hpp"

namespace fs = std::filesystem;

namespace tutti::train {
namespace {

// ============================================================================================
// Axes: a range with round ticks
// ============================================================================================

constexpr size_t kMaxPoints = 2000;
constexpr int kLeft = 72, kTop = 34, kBottom = 46;  // margins around a plot area; the legend is right of it
constexpr int kLegendMin = 160, kLegendMax = 560;
const char* const kPalette[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
const char* const kDashes[] = {"", "6,3", "2,2", "8,3,2,3"};  // after the 10 colours, the next dash

struct Axis {
  double lo = 0, hi = 1, step = 0.2;
  std::vector<double> ticks;
};

// A tick spacing of 1, 2 or 5 x 10^k giving about `target` intervals over [lo, hi].
Axis make_axis(double lo, double hi, int target = 5) {
  if (!(lo < hi)) {  // one value (or none): a unit-wide range around it
    const double c = std::isfinite(lo) ? lo : 0.0, half = std::max(std::abs(c) * 0.05, 0.5);
    lo = c - half;
    hi = c + half;
  }
  const double raw = (hi - lo) / target, mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double norm = raw / mag, step = (norm < 1.5 ? 1 : norm < 3.5 ? 2 : norm < 7.5 ? 5 : 10) * mag;
  Axis a;
  a.step = step;
  a.lo = std::floor(lo / step + 1e-9) * step;
  a.hi = std::ceil(hi / step - 1e-9) * step;
  for (double t = a.lo; t <= a.hi + step * 1e-6; t += step) a.ticks.push_back(std::abs(t) < step * 1e-9 ? 0.0 : t);
  return a;
}

// A tick label: as few decimals as the spacing needs; k or M on every tick of an axis that
// reaches 10^4 or 10^6.
std::string tick_label(double v, const Axis& axis) {
  char buf[32];
  const double top = std::max(std::abs(axis.lo), std::abs(axis.hi));
  if (top >= 1e6)
    std::snprintf(buf, sizeof buf, "%gM", v / 1e6);
  else if (top >= 1e4)
    std::snprintf(buf, sizeof buf, "%gk", v / 1e3);
  else if (axis.step >= 1e-4)
    std::snprintf(buf, sizeof buf, "%.*f", std::max(0, int(-std::floor(std::log10(axis.step) + 1e-9))), v);
  else
    std::snprintf(buf, sizeof buf, "%.3g", v);
  return buf;
}

std::string escape(const std::string& text) {
  std::string out;
  for (char c : text) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", v);
  return buf;
}

// ============================================================================================
// One chart
// ============================================================================================

struct Frame {  // the plot area in pixels and the data ranges it shows
  double x0, x1, y0, y1;
  Axis ax, ay;
  double px(double x) const { return x0 + (x - ax.lo) / (ax.hi - ax.lo) * (x1 - x0); }
  double py(double y) const { return y1 - (y - ay.lo) / (ay.hi - ay.lo) * (y1 - y0); }
};

// The legend's width: its longest name at about 7 pixels a character, within bounds.
int legend_width(const std::vector<Chart>& charts) {
  size_t longest = 0;
  for (const Chart& c : charts)
    for (const Series& s : c.series) longest = std::max(longest, s.name.size());
  return std::clamp(int(longest) * 7 + 50, kLegendMin, kLegendMax);
}

Frame frame_of(const Chart& chart, int plot_right, int height, double top) {
  double xlo = std::numeric_limits<double>::infinity(), xhi = -xlo, ylo = xlo, yhi = -xlo;
  for (const Series& s : chart.series)
    for (size_t i = 0; i < s.x.size() && i < s.y.size(); ++i) {
      if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) continue;
      xlo = std::min(xlo, s.x[i]), xhi = std::max(xhi, s.x[i]);
      ylo = std::min(ylo, s.y[i]), yhi = std::max(yhi, s.y[i]);
    }
  if (!std::isfinite(xlo)) xlo = xhi = ylo = yhi = 0;  // no points: an empty frame
  return {double(kLeft),          double(plot_right),     top + kTop,
          top + height - kBottom, make_axis(xlo, xhi, 8), make_axis(ylo, yhi, 5)};
}

void draw_axes(std::ostream& o, const Chart& chart, const Frame& f) {
  o << "<g class=\"axes\" stroke=\"#ccc\" stroke-width=\"1\">\n";
  for (double t : f.ay.ticks)
    o << "<line x1=\"" << num(f.x0) << "\" x2=\"" << num(f.x1) << "\" y1=\"" << num(f.py(t)) << "\" y2=\""
      << num(f.py(t)) << "\"/>\n";
  for (double t : f.ax.ticks)
    o << "<line x1=\"" << num(f.px(t)) << "\" x2=\"" << num(f.px(t)) << "\" y1=\"" << num(f.y0) << "\" y2=\""
      << num(f.y1) << "\"/>\n";
  o << "<rect x=\"" << num(f.x0) << "\" y=\"" << num(f.y0) << "\" width=\"" << num(f.x1 - f.x0) << "\" height=\""
    << num(f.y1 - f.y0) << "\" fill=\"none\" stroke=\"#333\"/>\n</g>\n";
  o << "<g class=\"ticks\" fill=\"#333\">\n";
  for (double t : f.ay.ticks)
    o << "<text x=\"" << num(f.x0 - 6) << "\" y=\"" << num(f.py(t) + 4) << "\" text-anchor=\"end\">"
      << tick_label(t, f.ay) << "</text>\n";
  for (double t : f.ax.ticks)
    o << "<text x=\"" << num(f.px(t)) << "\" y=\"" << num(f.y1 + 16) << "\" text-anchor=\"middle\">"
      << tick_label(t, f.ax) << "</text>\n";
  o << "</g>\n";
  o << "<text class=\"title\" x=\"" << num((f.x0 + f.x1) / 2) << "\" y=\"" << num(f.y0 - 12)
    << "\" text-anchor=\"middle\" font-size=\"14\" font-weight=\"bold\">" << escape(chart.title) << "</text>\n";
  o << "<text class=\"xlabel\" x=\"" << num((f.x0 + f.x1) / 2) << "\" y=\"" << num(f.y1 + 36)
    << "\" text-anchor=\"middle\">" << escape(chart.x_label) << "</text>\n";
  const double mid = (f.y0 + f.y1) / 2;
  o << "<text class=\"ylabel\" x=\"18\" y=\"" << num(mid) << "\" text-anchor=\"middle\" transform=\"rotate(-90 18 "
    << num(mid) << ")\">" << escape(chart.y_label) << "</text>\n";
}

// One series: polylines between gaps, optional markers, thinned to kMaxPoints.
void draw_series(std::ostream& o, const Series& s, const Frame& f, size_t index) {
  const std::string color = kPalette[index % 10], dash = kDashes[(index / 10) % 4];
  const size_t n = std::min(s.x.size(), s.y.size()), stride = std::max<size_t>(1, (n + kMaxPoints - 1) / kMaxPoints);
  o << "<g class=\"series\" data-name=\"" << escape(s.name) << "\" stroke=\"" << color << "\" fill=\"none\">\n<title>"
    << escape(s.name) << "</title>\n";
  std::string points;
  auto flush = [&] {
    if (!points.empty())
      o << "<polyline stroke-width=\"1.5\"" << (dash.empty() ? "" : " stroke-dasharray=\"" + dash + "\"")
        << " points=\"" << points << "\"/>\n";
    points.clear();
  };
  std::vector<size_t> shown;
  for (size_t i = 0; i < n; i += stride) shown.push_back(i);
  if (n > 0 && shown.back() != n - 1) shown.push_back(n - 1);
  std::ostringstream dots;
  double last_x = NAN, last_y = NAN;
  for (size_t i : shown) {
    if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) {
      flush();
      continue;
    }
    last_x = f.px(s.x[i]), last_y = f.py(s.y[i]);
    points += (points.empty() ? "" : " ") + num(last_x) + "," + num(last_y);
    if (s.markers)
      dots << "<circle cx=\"" << num(last_x) << "\" cy=\"" << num(last_y) << "\" r=\"2.5\" fill=\"" << color
           << "\"/>\n";
  }
  flush();
  o << dots.str();
  if (s.end_marker && std::isfinite(last_x))
    o << "<path class=\"end\" stroke-width=\"2\" d=\"M" << num(last_x - 4) << "," << num(last_y - 4)
      << " l8,8 m0,-8 l-8,8\"/>\n";
  o << "</g>\n";
}

void draw_legend(std::ostream& o, const Chart& chart, const Frame& f) {
  const double x = f.x1 + 14;
  const size_t fits = std::max<size_t>(1, size_t((f.y1 - f.y0) / 16));
  o << "<g class=\"legend\">\n";
  for (size_t i = 0; i < chart.series.size(); ++i) {
    const double y = f.y0 + 8 + 16 * double(i);
    if (i + 1 == fits && chart.series.size() > fits) {
      o << "<text x=\"" << num(x) << "\" y=\"" << num(y + 4) << "\">... and " << chart.series.size() - i
        << " more</text>\n";
      break;
    }
    const std::string dash = kDashes[(i / 10) % 4];
    o << "<line x1=\"" << num(x) << "\" x2=\"" << num(x + 22) << "\" y1=\"" << num(y) << "\" y2=\"" << num(y)
      << "\" stroke=\"" << kPalette[i % 10] << "\" stroke-width=\"2\""
      << (dash.empty() ? "" : " stroke-dasharray=\"" + dash + "\"") << "/>\n";
    o << "<text x=\"" << num(x + 28) << "\" y=\"" << num(y + 4) << "\">" << escape(chart.series[i].name) << "</text>\n";
  }
  o << "</g>\n";
}

// ============================================================================================
// A run's metrics
// ============================================================================================

double number_or_nan(const nlohmann::json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_number() ? it->get<double>() : NAN;
}

// Points in step order: an evaluation run in the background may be logged after later steps.
void sort_by_x(Series& s) {
  std::vector<std::pair<double, double>> points;
  for (size_t i = 0; i < s.x.size() && i < s.y.size(); ++i) points.emplace_back(s.x[i], s.y[i]);
  std::stable_sort(points.begin(), points.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (size_t i = 0; i < points.size(); ++i) s.x[i] = points[i].first, s.y[i] = points[i].second;
}

// batch x context of the run (0 when run.toml cannot be read).
double tokens_per_step(const fs::path& run_dir) {
  try {
    TrainConfig config;
    apply_toml_file(config, (run_dir / "run.toml").string());
    return double(config.batch) * config.context;
  } catch (const std::exception&) {
    return 0;
  }
}

}  // namespace

std::string render_svg(const std::vector<Chart>& charts, int width, int chart_height) {
  std::ostringstream o;
  const int height = chart_height * int(std::max<size_t>(1, charts.size()));
  const int plot_right = width - kLegendMin;  // the plot keeps its size; a long legend widens the page
  width = plot_right + legend_width(charts);
  o << "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << width
    << "\" height=\"" << height << "\" viewBox=\"0 0 " << width << " " << height
    << "\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  for (size_t c = 0; c < charts.size(); ++c) {
    const Frame f = frame_of(charts[c], plot_right, chart_height, double(c) * chart_height);
    o << "<g class=\"chart\">\n";
    draw_axes(o, charts[c], f);
    for (size_t i = 0; i < charts[c].series.size(); ++i) draw_series(o, charts[c].series[i], f, i);
    draw_legend(o, charts[c], f);
    o << "</g>\n";
  }
  o << "</svg>\n";
  return o.str();
}

void write_svg(const std::string& path, const std::vector<Chart>& charts) {
  // No fsync: a plot is redrawn from the metrics at every evaluation, so it needs to be whole
  // (rename), not durable, and must not stall the training loop on a busy disk. The temporary
  // name is unique per call, so threads of one process (the sweep's) never share one.
  static std::atomic<uint64_t> calls{0};
  const std::string tmp = path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(calls++);
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << render_svg(charts);
    out.close();
    if (!out) {
      std::error_code ec;
      fs::remove(tmp, ec);
      TUTTI_FAIL(Error, "cannot write the plot '", tmp, "'");
    }
  }
  std::error_code ec, ignored;
  fs::rename(tmp, path, ec);
  if (ec) fs::remove(tmp, ignored);
  TUTTI_CHECK(!ec, "cannot rename the plot '", tmp, "' to '", path, "': ", ec.message());
}

std::string plot_run(const std::string& run_dir) {
  fs::path dir = fs::path(run_dir).lexically_normal();
  if (dir.filename().empty()) dir = dir.parent_path();  // "run/" -> "run"
  const fs::path metrics = dir / "metrics.jsonl";
  std::ifstream in(metrics);
  TUTTI_CHECK(in.good(), "cannot plot the run: '", metrics.string(), "' cannot be read");
  Series step_loss{"train loss (step)", {}, {}}, eval_train{"train loss (eval)", {}, {}, true},
      eval_val{"val loss (eval)", {}, {}, true}, speed{"", {}, {}};
  const double tokens = tokens_per_step(dir);
  speed.name = tokens > 0 ? "tokens/s" : "ms per step";
  std::string line;
  while (std::getline(in, line)) {
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object()) continue;
    const double step = number_or_nan(j, "step");
    if (!std::isfinite(step)) continue;
    if (j.contains("val_loss") || j.contains("train_loss")) {
      eval_train.x.push_back(step), eval_train.y.push_back(number_or_nan(j, "train_loss"));
      eval_val.x.push_back(step), eval_val.y.push_back(number_or_nan(j, "val_loss"));
    } else if (j.contains("loss")) {
      step_loss.x.push_back(step), step_loss.y.push_back(number_or_nan(j, "loss"));  // null: a skipped step
      const double ms = number_or_nan(j, "ms");
      speed.x.push_back(step), speed.y.push_back(ms > 0 && tokens > 0 ? tokens / (ms / 1e3) : ms);
    }
  }
  for (Series* s : {&step_loss, &eval_train, &eval_val, &speed}) sort_by_x(*s);
  std::vector<Chart> charts = {
      {"loss: " + dir.filename().string(), "step", "loss", {step_loss, eval_train, eval_val}},
      {"throughput", "step", tokens > 0 ? "tokens/s" : "ms per step", {speed}},
  };
  const std::string out = (dir / "plot.svg").string();
  write_svg(out, charts);
  return out;
}

}  // namespace tutti::train
