// The sweep file ([base], [search], [sweep]) and the trials planned from it. Every key of [base]
// and [search] is a setting of settings() in config.hpp, checked by that setting's own parser.
#include <toml++/toml.h>
#include <algorithm>
#include <charconv>
#include <cmath>
#include <filesystem>
#include <set>
#include <sstream>

#include "tutti/core/error.hpp"
#include "tutti/core/random.hpp"
#include "tutti/train/config.hpp"
#include "tutti/train/sweep.hpp"

namespace fs = std::filesystem;

namespace tutti::train {
namespace {

constexpr size_t kMaxTrials = 10000;

// Settings a sweep file may not give: the sweep sets them per trial, or a trial cannot honour them.
std::string forbidden_reason(const std::string& key) {
  if (key == "out") return "the sweep gives every trial its own directory under [sweep] out";
  if (key == "threads") return "set [sweep] threads_per_trial instead";
  if (key == "dp" || key == "pp" || key == "tp" || key == "eval_rank")
    return "a trial is one process (no data, pipeline or tensor parallelism, no evaluation rank)";
  return "";
}

std::string shortest(double v) {
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, end);
}

// Where a key of the file is, for error messages: "sweep file 'x.toml': [search] lr".
struct Where {
  const std::string& path;
  std::string table, key;
  std::string str() const { return "sweep file '" + path + "': [" + table + "] " + key; }
};

const Setting& find_setting(const std::vector<Setting>& all, const Where& w) {
  auto it = std::find_if(all.begin(), all.end(), [&](const Setting& s) { return s.name == w.key; });
  TUTTI_CHECK_AS(ConfigError, it != all.end(), "sweep file '", w.path, "': [", w.table, "] has unknown key '", w.key,
                 "' (not a setting of `tutti train`)");
  const std::string why = forbidden_reason(w.key);
  TUTTI_CHECK_AS(ConfigError, why.empty(), w.str(), ": cannot be set in a sweep: ", why);
  return *it;
}

// A TOML value as the text `train --KEY` takes, checked by the setting's parser.
std::string value_text(const Setting& s, const toml::node& node, const Where& w) {
  std::string text;
  if (s.kind == Setting::Kind::text) {
    TUTTI_CHECK_AS(ConfigError, node.is_string(), w.str(), ": must be a string");
    text = *node.value<std::string>();
  } else if (node.is_integer()) {
    text = std::to_string(*node.value<int64_t>());
  } else {
    TUTTI_CHECK_AS(ConfigError, node.is_floating_point() && s.kind == Setting::Kind::real, w.str(), ": must be ",
                   s.kind == Setting::Kind::integer ? "an integer" : "a number");
    text = shortest(*node.value<double>());
  }
  TrainConfig scratch;
  try {
    for (Setting& t : settings(scratch))
      if (t.name == s.name) t.set(text);
  } catch (const ConfigError& e) {
    TUTTI_FAIL(ConfigError, w.str(), ": ", e.what());
  }
  return text;
}

double range_bound(const toml::table& range, const char* name, const Where& w) {
  const toml::node* n = range.get(name);
  TUTTI_CHECK_AS(ConfigError, n && (n->is_integer() || n->is_floating_point()), w.str(), ": a range needs a number '",
                 name, "' ({min = ..., max = ..., log = true|false})");
  return n->is_integer() ? double(*n->value<int64_t>()) : *n->value<double>();
}

SearchSpace parse_range(const Setting& s, const toml::table& range, const Where& w) {
  for (auto&& [k, v] : range)
    TUTTI_CHECK_AS(ConfigError, k.str() == "min" || k.str() == "max" || k.str() == "log", w.str(),
                   ": unknown range key '", k.str(), "' (a range is {min = ..., max = ..., log = true|false})");
  TUTTI_CHECK_AS(ConfigError, s.kind != Setting::Kind::text, w.str(),
                 ": a text setting takes a list of values, not a range");
  SearchSpace space{w.key, {}, true, range_bound(range, "min", w), range_bound(range, "max", w), false};
  if (const toml::node* log = range.get("log")) {
    TUTTI_CHECK_AS(ConfigError, log->is_boolean(), w.str(), ": 'log' must be true or false");
    space.log = *log->value<bool>();
  }
  TUTTI_CHECK_AS(ConfigError, std::isfinite(space.min) && std::isfinite(space.max), w.str(),
                 ": range bounds must be finite");
  TUTTI_CHECK_AS(ConfigError, space.min <= space.max, w.str(), ": range min ", space.min, " is greater than max ",
                 space.max);
  TUTTI_CHECK_AS(ConfigError, !space.log || space.min > 0, w.str(), ": a log range needs min > 0, got ", space.min);
  if (s.kind == Setting::Kind::integer)
    TUTTI_CHECK_AS(ConfigError, space.min == std::floor(space.min) && space.max == std::floor(space.max), w.str(),
                   ": an integer setting needs integer range bounds, got ", space.min, " and ", space.max);
  return space;
}

SearchSpace parse_search(const Setting& s, const toml::node& node, const Where& w) {
  if (const toml::table* range = node.as_table()) return parse_range(s, *range, w);
  const toml::array* list = node.as_array();
  TUTTI_CHECK_AS(ConfigError, list, w.str(),
                 ": must be a list of values [a, b, ...] or a range {min = ..., max = ...}");
  TUTTI_CHECK_AS(ConfigError, !list->empty(), w.str(), ": the list of values is empty");
  SearchSpace space{w.key, {}, false, 0, 0, false};
  for (const toml::node& v : *list) {
    std::string text = value_text(s, v, w);
    TUTTI_CHECK_AS(ConfigError, std::find(space.values.begin(), space.values.end(), text) == space.values.end(),
                   w.str(), ": the value ", text, " is listed twice");
    space.values.push_back(std::move(text));
  }
  return space;
}

int64_t integer(const toml::node& node, const Where& w, int64_t min) {
  TUTTI_CHECK_AS(ConfigError, node.is_integer(), w.str(), ": must be an integer");
  const int64_t v = *node.value<int64_t>();
  TUTTI_CHECK_AS(ConfigError, v >= min, w.str(), ": must be at least ", min, ", got ", v);
  return v;
}

void parse_sweep_table(const toml::table& table, SweepConfig& c) {
  for (auto&& [key, node] : table) {
    const Where w{c.path, "sweep", std::string(key.str())};
    if (w.key == "trials")
      c.trials = int(integer(node, w, 1));
    else if (w.key == "seed")
      c.seed = integer(node, w, 0);
    else if (w.key == "workers")
      c.workers = int(integer(node, w, 1));
    else if (w.key == "threads_per_trial")
      c.threads_per_trial = int(integer(node, w, 1));
    else if (w.key == "out" || w.key == "metric") {
      TUTTI_CHECK_AS(ConfigError, node.is_string() && !node.value<std::string>()->empty(), w.str(),
                     ": must be a non-empty string");
      (w.key == "out" ? c.out : c.metric) = *node.value<std::string>();
      TUTTI_CHECK_AS(ConfigError, w.key == "out" || c.metric == "val_loss" || c.metric == "train_loss", w.str(),
                     ": must be val_loss or train_loss, got '", c.metric, "'");
    } else if (w.key == "eta") {
      TUTTI_CHECK_AS(ConfigError, node.is_integer() || node.is_floating_point(), w.str(), ": must be a number");
      c.eta = node.is_integer() ? double(*node.value<int64_t>()) : *node.value<double>();
      TUTTI_CHECK_AS(ConfigError, c.eta > 1, w.str(), ": the halving factor must be greater than 1, got ", c.eta);
    } else if (w.key == "rungs") {
      const toml::array* list = node.as_array();
      TUTTI_CHECK_AS(ConfigError, list, w.str(), ": must be a list of steps, e.g. [100, 300] ([] turns halving off)");
      c.rungs_given = true;
      for (const toml::node& r : *list) {
        c.rungs.push_back(integer(r, w, 1));
        TUTTI_CHECK_AS(ConfigError, c.rungs.size() < 2 || c.rungs.back() > c.rungs[c.rungs.size() - 2], w.str(),
                       ": steps must increase, got ", c.rungs[c.rungs.size() - 2], " then ", c.rungs.back());
      }
    } else {
      TUTTI_FAIL(ConfigError, "sweep file '", c.path, "': [sweep] has unknown key '", w.key,
                 "' (known: trials, seed, workers, threads_per_trial, out, metric, eta, rungs)");
    }
  }
}

}  // namespace

SweepConfig load_sweep_config(const std::string& path) {
  toml::table file;
  try {
    file = toml::parse_file(path);
  } catch (const toml::parse_error& e) {
    std::ostringstream where;
    where << e.source().begin;
    TUTTI_FAIL(ConfigError, "sweep file '", path, "': ", e.description(), " at ", where.str());
  }
  SweepConfig c;
  c.path = path;
  TrainConfig defaults;
  const std::vector<Setting> all = settings(defaults);
  c.seed = defaults.seed;
  for (auto&& [key, node] : file) {
    const std::string name(key.str());
    TUTTI_CHECK_AS(ConfigError, name == "base" || name == "search" || name == "sweep", "sweep file '", path,
                   "': unknown table or key '", name, "' (the tables are [base], [search] and [sweep])");
    TUTTI_CHECK_AS(ConfigError, node.is_table(), "sweep file '", path, "': '", name, "' must be a table [", name, "]");
  }
  if (const toml::table* base = file["base"].as_table())
    for (auto&& [key, node] : *base) {
      const Where w{path, "base", std::string(key.str())};
      c.base.emplace_back(w.key, value_text(find_setting(all, w), node, w));
    }
  if (const toml::table* search = file["search"].as_table())
    for (auto&& [key, node] : *search) {
      const Where w{path, "search", std::string(key.str())};
      const Setting& s = find_setting(all, w);
      TUTTI_CHECK_AS(ConfigError, std::none_of(c.base.begin(), c.base.end(), [&](auto& b) { return b.first == w.key; }),
                     w.str(), ": is set in [base] too; give it in one table");
      c.search.push_back(parse_search(s, node, w));
    }
  TUTTI_CHECK_AS(ConfigError, !c.search.empty(), "sweep file '", path,
                 "': the search space is empty: give [search] at least one setting with a list of values "
                 "(lr = [1e-3, 3e-3]) or a range (lr = {min = 1e-4, max = 1e-2, log = true})");
  if (const toml::table* sweep = file["sweep"].as_table()) parse_sweep_table(*sweep, c);
  const auto range = std::find_if(c.search.begin(), c.search.end(), [](const SearchSpace& s) { return s.is_range; });
  TUTTI_CHECK_AS(ConfigError, range == c.search.end() || c.trials > 0, "sweep file '", path, "': [search] ",
                 range == c.search.end() ? "" : range->key, " is a range: set [sweep] trials = N for a random search");
  return c;
}

// ============================================================================================
// Planning the trials
// ============================================================================================

namespace {

std::string shell_quote(const std::string& word) {
  const bool plain = !word.empty() && std::all_of(word.begin(), word.end(), [](char ch) {
    return std::isalnum(static_cast<unsigned char>(ch)) || std::string("_-./=:+,@%").find(ch) != std::string::npos;
  });
  if (plain) return word;
  std::string q = "'";
  for (char ch : word) q += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return q + "'";
}

Setting::Kind kind_of(const std::string& key) {
  TrainConfig scratch;
  for (const Setting& s : settings(scratch))
    if (s.name == key) return s.kind;
  return Setting::Kind::text;
}

// One value of a searched setting for a random-search trial. Sampled reals keep 3 significant
// digits, so that tables and commands stay readable; integers are rounded into the range.
std::string sample(const SearchSpace& s, Rng& rng) {
  if (!s.is_range) return s.values[rng.below(s.values.size())];
  const double u = rng.uniform();
  const double v =
      s.log ? std::exp(std::log(s.min) + u * (std::log(s.max) - std::log(s.min))) : s.min + u * (s.max - s.min);
  if (kind_of(s.key) == Setting::Kind::integer)
    return std::to_string(std::clamp<int64_t>(std::llround(v), int64_t(s.min), int64_t(s.max)));
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", v);
  return buf;
}

// The searched values of every trial: the grid in key order (the last key varies fastest),
// or `trials` random draws, trial i from its own stream of the sweep seed.
std::vector<SettingValues> search_points(const SweepConfig& c) {
  std::vector<SettingValues> points;
  if (c.trials > 0) {
    for (int i = 0; i < c.trials; ++i) {
      Rng rng = Rng::stream(uint64_t(c.seed), uint64_t(i), 0x5EEE9ull);
      SettingValues p;
      for (const SearchSpace& s : c.search) p.emplace_back(s.key, sample(s, rng));
      points.push_back(std::move(p));
    }
    return points;
  }
  size_t total = 1;
  for (const SearchSpace& s : c.search) {
    total *= s.values.size();
    TUTTI_CHECK_AS(ConfigError, total <= kMaxTrials, "sweep file '", c.path, "': the grid has more than ", kMaxTrials,
                   " trials; sample it with [sweep] trials = N");
  }
  for (size_t t = 0; t < total; ++t) {
    SettingValues p(c.search.size());
    size_t rest = t;
    for (size_t k = c.search.size(); k-- > 0;) {
      const auto& values = c.search[k].values;
      p[k] = {c.search[k].key, values[rest % values.size()]};
      rest /= values.size();
    }
    points.push_back(std::move(p));
  }
  return points;
}

std::string describe(const SettingValues& values) {
  std::string text;
  for (const auto& [key, value] : values) text += (text.empty() ? "" : ", ") + key + "=" + value;
  return text;
}

bool has_key(const SettingValues& values, const std::string& key) {
  return std::any_of(values.begin(), values.end(), [&](const auto& kv) { return kv.first == key; });
}

// A trial's TrainConfig built from the base and its searched values and validated; fills `t`.
void build_trial(const SweepConfig& c, const std::string& binary, Trial& t) {
  TrainConfig config;
  std::vector<Setting> all = settings(config);
  auto set = [&](const std::string& key, const std::string& value) {
    for (Setting& s : all)
      if (s.name == key) s.set(value);
  };
  for (const auto& [key, value] : c.base) set(key, value);
  for (const auto& [key, value] : t.searched) set(key, value);
  if (!has_key(c.base, "seed") && !has_key(t.searched, "seed"))  // else: the user's seed for every trial
    config.seed = int64_t(Rng::stream(uint64_t(c.seed), uint64_t(t.index), 0x5EED5ull).next() >> 33);
  config.threads = c.threads_per_trial;
  config.out = t.out;
  try {
    config.validate();
  } catch (const ConfigError& e) {
    TUTTI_FAIL(ConfigError, "sweep file '", c.path, "': ", t.name, " (", describe(t.searched), "): ", e.what());
  }
  t.seed = config.seed;
  t.steps = config.steps;
  t.eval_interval = config.eval_interval;
  t.argv = {binary, "train"};
  auto flag = [&](const std::string& key, const std::string& value) {
    std::string f = "--" + key;
    std::replace(f.begin(), f.end(), '_', '-');
    t.argv.push_back(f);
    t.argv.push_back(value);
  };
  for (const auto& [key, value] : c.base)
    if (key != "seed") flag(key, value);
  for (const auto& [key, value] : t.searched)
    if (key != "seed") flag(key, value);
  flag("seed", std::to_string(config.seed));
  flag("threads", std::to_string(config.threads));
  flag("out", config.out);
}

// The rungs: given, or eval_interval x eta^k (rounded up to evaluation steps) below every
// trial's end; each must be an evaluation step of every trial, before its last step.
void resolve_rungs(SweepConfig& c, const std::vector<Trial>& trials) {
  if (!c.rungs_given) {
    const int64_t e = trials.front().eval_interval;
    int64_t end = trials.front().steps;
    for (const Trial& t : trials) end = std::min(end, t.steps);
    for (int64_t r = e; r < end; r = std::max(r + e, int64_t(std::ceil(double(r) * c.eta / double(e))) * e))
      c.rungs.push_back(r);
  }
  for (int64_t r : c.rungs)
    for (const Trial& t : trials) {
      TUTTI_CHECK_AS(ConfigError, r % t.eval_interval == 0, "sweep file '", c.path, "': [sweep] rungs: step ", r,
                     " is not an evaluation step of ", t.name, " (eval_interval ", t.eval_interval,
                     "); rungs must be multiples of eval_interval");
      TUTTI_CHECK_AS(ConfigError, r < t.steps, "sweep file '", c.path, "': [sweep] rungs: step ", r,
                     " is not before the end of ", t.name, " (steps ", t.steps, ")");
    }
}

}  // namespace

std::string Trial::command() const {
  std::string line;
  for (const std::string& word : argv) {
    if (!line.empty()) line += ' ';
    line += shell_quote(word);
  }
  return line;
}

std::string format_plan(const SweepConfig& c, const std::vector<Trial>& trials) {
  std::ostringstream out;
  out << trials.size() << " trials (" << (c.trials > 0 ? "random search" : "grid") << "), halving eta " << c.eta
      << " on " << c.metric << " at steps [";
  for (size_t i = 0; i < c.rungs.size(); ++i) out << (i ? ", " : "") << c.rungs[i];
  out << "]" << (c.rungs.empty() ? " (no early stopping)" : "") << ", into " << c.out << "\n";
  for (const Trial& t : trials)
    out << t.name << ": " << describe(t.searched) << ", seed " << t.seed << "\n  " << t.command() << "\n";
  return out.str();
}

std::vector<Trial> plan_trials(SweepConfig& c, const std::string& binary) {
  const std::vector<SettingValues> points = search_points(c);
  const int digits = std::max(3, int(std::to_string(points.size() - 1).size()));
  std::vector<Trial> trials;
  for (size_t i = 0; i < points.size(); ++i) {
    Trial t;
    t.index = int(i);
    const std::string number = std::to_string(i);
    t.name = "trial_" + std::string(size_t(digits) - number.size(), '0') + number;
    t.searched = points[i];
    t.out = (fs::path(c.out) / t.name).string();
    build_trial(c, binary, t);
    trials.push_back(std::move(t));
  }
  resolve_rungs(c, trials);
  return trials;
}

}  // namespace tutti::train
