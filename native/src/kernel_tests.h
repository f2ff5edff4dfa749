#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace decima {

using Bytes = std::vector<uint8_t>;
using BufferMap = std::map<std::string, Bytes>;
using ParamMap = std::map<std::string, double>;

// Run one kernel on host buffers (see kernel_tests.cu for the names and their inputs).
BufferMap run_kernel_test(const std::string& name, const BufferMap& inputs, const ParamMap& params);

}  // namespace decima
