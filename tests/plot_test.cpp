// The SVG charts: well-formed documents holding every series, thinned and gapped lines, and the
// plot of a run directory from a metrics.jsonl that also holds lines of other kinds.
#include "tutti/train/plot.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <regex>
#include <sstream>

#include "process_util.hpp"
#include "test_util.hpp"
#include "tutti/core/error.hpp"

using namespace tutti;
using namespace tutti::train;
using tutti::test::scratch;
using tutti::test::slurp;
namespace fs = std::filesystem;

namespace {

// Every tag closed in order (a small well-formedness check that needs no XML library), and
// xmllint's verdict where it is installed.
::testing::AssertionResult well_formed(const std::string& svg, const fs::path& file) {
  std::vector<std::string> open;
  static const std::regex tag(R"(<(/?)([a-zA-Z][a-zA-Z0-9]*)[^<>]*?(/?)>)");
  for (auto it = std::sregex_iterator(svg.begin(), svg.end(), tag); it != std::sregex_iterator(); ++it) {
    const std::string name = (*it)[2];
    if ((*it)[3] == "/") continue;  // <x ... />
    if ((*it)[1] == "/") {
      if (open.empty() || open.back() != name)
        return ::testing::AssertionFailure() << "</" << name << "> closes nothing";
      open.pop_back();
    } else {
      open.push_back(name);
    }
  }
  if (!open.empty()) return ::testing::AssertionFailure() << "<" << open.back() << "> is never closed";
  if (svg.find("<svg") == std::string::npos) return ::testing::AssertionFailure() << "no <svg> element";
  if (std::system("command -v xmllint >/dev/null 2>&1") == 0 &&
      std::system(("xmllint --noout " + file.string() + " 2>/dev/null").c_str()) != 0)
    return ::testing::AssertionFailure() << "xmllint rejects " << file;
  return ::testing::AssertionSuccess();
}

// The points of the polylines of the series named `name`, one vector per polyline.
std::vector<int> polyline_points(const std::string& svg, const std::string& name) {
  const size_t at = svg.find("data-name=\"" + name + "\"");
  if (at == std::string::npos) return {};
  const std::string group = svg.substr(at, svg.find("</g>", at) - at);
  std::vector<int> counts;
  static const std::regex line(R"re(<polyline[^>]* points="([^"]*)")re");
  for (auto it = std::sregex_iterator(group.begin(), group.end(), line); it != std::sregex_iterator(); ++it) {
    const std::string points = (*it)[1];
    counts.push_back(int(std::count(points.begin(), points.end(), ',')));
  }
  return counts;
}

void write(const fs::path& p, const std::string& text) { std::ofstream(p) << text; }

}  // namespace

TEST(Plot, ChartsHoldEverySeriesAndEscapeText) {
  Series a{"lr=0.003 <best> & co", {0, 1, 2, 3}, {4, 3, 2.5, 2}}, b{"lr=1e-5", {0, 1, 2}, {4, 3.9, 3.8}, true};
  b.end_marker = true;
  const std::vector<Chart> charts = {{"loss", "step", "val loss", {a, b}}, {"throughput", "step", "tokens/s", {b}}};
  const fs::path file = scratch() / "two_charts.svg";
  write_svg(file.string(), charts);
  const std::string svg = slurp(file);
  EXPECT_TRUE(well_formed(svg, file));
  EXPECT_EQ(svg, render_svg(charts));
  EXPECT_NE(svg.find("lr=0.003 &lt;best&gt; &amp; co"), std::string::npos);
  for (const char* text : {">loss<", ">throughput<", ">step<", ">val loss<", ">tokens/s<"})
    EXPECT_NE(svg.find(text), std::string::npos) << text;
  EXPECT_EQ(polyline_points(svg, "lr=1e-5"), std::vector<int>({3}));
  size_t charts_found = 0;
  for (size_t at = 0; (at = svg.find("class=\"chart\"", at)) != std::string::npos; ++at) ++charts_found;
  EXPECT_EQ(charts_found, 2u);
  EXPECT_NE(svg.find("class=\"end\""), std::string::npos) << "a stopped series ends in a cross";
  EXPECT_FALSE(fs::exists(file.string() + ".tmp")) << "no temporary file is left";
}

TEST(Plot, GapsAndThinning) {
  Series gappy{"gappy", {1, 2, 3, 4, 5}, {1, 2, NAN, 4, 5}};
  Series long_one{"long", {}, {}};
  for (int i = 0; i < 10000; ++i) long_one.x.push_back(i), long_one.y.push_back(std::sin(i * 0.01));
  const std::string svg = render_svg({{"t", "x", "y", {gappy, long_one}}});
  EXPECT_EQ(polyline_points(svg, "gappy"), std::vector<int>({2, 2})) << "a NaN splits the line";
  const std::vector<int> thinned = polyline_points(svg, "long");
  ASSERT_EQ(thinned.size(), 1u);
  EXPECT_LE(thinned[0], 2001);
  EXPECT_GE(thinned[0], 1000);
  EXPECT_NE(render_svg({{"empty", "x", "y", {}}}).find("</svg>"), std::string::npos) << "no series still draws";
}

TEST(Plot, RunDirectoryWithOtherLineKinds) {
  const fs::path run = scratch() / "plot_run";
  fs::create_directories(run);
  write(run / "run.toml", "batch = 2\ncontext = 16\n");
  write(run / "metrics.jsonl",
        "{\"event\":\"start\",\"world\":1}\n"
        "{\"step\":0,\"train_loss\":5.5,\"val_loss\":5.6}\n"
        "{\"step\":1,\"loss\":5.4,\"lr\":0.001,\"grad_norm\":1.2,\"ms\":1.0,\"joules\":0.5}\n"
        "{\"step\":2,\"loss\":null,\"lr\":0.001,\"grad_norm\":-1,\"ms\":2.0,\"skipped\":true}\n"
        "{\"step\":2,\"straggler_rank\":1,\"compute_ms\":3,\"median_ms\":1}\n"
        "{\"checkpoint_step\":2,\"bytes\":100,\"seconds\":0.1}\n"
        "not json at all\n"
        "{\"step\":3,\"loss\":5.2,\"lr\":0.001,\"grad_norm\":1.1,\"ms\":1.0,\"new_field\":[1,2]}\n"
        "{\"step\":3,\"train_loss\":5.1,\"val_loss\":5.3,\"eval_ms\":12,\"reported_at_step\":3}\n"
        "{\"energy_joules\":3.5,\"joules_per_token\":0.01}\n"
        "{\"step\":4,\"loss\":5.1,\"lr\"");  // torn: the run was killed mid-line
  const std::string out = plot_run(run.string() + "/");
  EXPECT_EQ(fs::path(out), run / "plot.svg");
  const std::string svg = slurp(out);
  EXPECT_TRUE(well_formed(svg, out));
  EXPECT_EQ(polyline_points(svg, "train loss (step)"), std::vector<int>({1, 1})) << "steps 1 and 3, the null a gap";
  EXPECT_EQ(polyline_points(svg, "val loss (eval)"), std::vector<int>({2}));
  EXPECT_EQ(polyline_points(svg, "train loss (eval)"), std::vector<int>({2}));
  EXPECT_EQ(polyline_points(svg, "tokens/s"), std::vector<int>({3}));
  EXPECT_NE(svg.find(">32k<"), std::string::npos) << "2 x 16 tokens in 1 ms is 32k tokens/s, a tick of the axis";

  fs::remove(run / "run.toml");  // without the run's settings: ms per step
  EXPECT_NE(slurp(plot_run(run.string())).find(">ms per step<"), std::string::npos);
}

TEST(Plot, MissingMetricsIsAnError) {
  const fs::path run = scratch() / "no_metrics";
  fs::create_directories(run);
  const std::string what = test::message_of([&] { plot_run(run.string()); });
  EXPECT_NE(what.find("metrics.jsonl"), std::string::npos) << what;
  EXPECT_FALSE(fs::exists(run / "plot.svg"));
}

TEST(Plot, EvaluationsLoggedOutOfOrderAreDrawnInStepOrder) {
  const fs::path run = scratch() / "late_evals";
  fs::create_directories(run);
  write(run / "metrics.jsonl",
        "{\"step\":20,\"train_loss\":4.0,\"val_loss\":4.1}\n"
        "{\"step\":10,\"train_loss\":5.0,\"val_loss\":5.1,\"reported_at_step\":20}\n"
        "{\"step\":30,\"train_loss\":3.0,\"val_loss\":3.1}\n");
  const std::string svg = slurp(plot_run(run.string()));
  const size_t at = svg.find("data-name=\"val loss (eval)\"");
  ASSERT_NE(at, std::string::npos);
  static const std::regex points(R"re(points="([^"]*)")re");
  std::smatch m;
  const std::string group = svg.substr(at);
  ASSERT_TRUE(std::regex_search(group, m, points));
  std::vector<double> xs;
  std::istringstream in(m[1].str());
  for (std::string xy; in >> xy;) xs.push_back(std::stod(xy.substr(0, xy.find(','))));
  ASSERT_EQ(xs.size(), 3u);
  EXPECT_TRUE(std::is_sorted(xs.begin(), xs.end())) << m[1];
}
