// JSON from checkpoint files, parsed strictly: callers reject a key that appears twice in one
// object (nlohmann keeps the last one silently, which would let two tensors or files share a name).
#pragma once
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

namespace tutti::ckpt {

// Parses `text` (throws nlohmann::json::exception when it is not JSON) and sets `duplicate` to the
// first key found twice in one object, or "" when there is none.
inline nlohmann::json parse_json_noting_duplicates(const std::string& text, std::string& duplicate) {
  using Json = nlohmann::json;
  std::vector<std::set<std::string>> keys_per_object;
  duplicate.clear();
  Json::parser_callback_t callback = [&](int /*depth*/, Json::parse_event_t event, Json& parsed) {
    if (event == Json::parse_event_t::object_start) {
      keys_per_object.emplace_back();
    } else if (event == Json::parse_event_t::object_end) {
      if (!keys_per_object.empty()) keys_per_object.pop_back();
    } else if (event == Json::parse_event_t::key && !keys_per_object.empty()) {
      const std::string& key = parsed.get_ref<const std::string&>();
      if (!keys_per_object.back().insert(key).second && duplicate.empty()) duplicate = key;
    }
    return true;
  };
  return Json::parse(text, callback);
}

}  // namespace tutti::ckpt
