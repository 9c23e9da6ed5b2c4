// Safetensors: files written by save_safetensors read back bit for bit as zero-copy views that
// outlive the file object; sharded checkpoints through an index; and every kind of broken file
// (truncated, lying header length, bad JSON, wrong sizes, overlaps, unknown dtypes, bad index)
// gives a kvcache::Error that names the problem instead of a crash.
#include "kvcache/model/safetensors.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "temp_dir.hpp"
#include "test_util.hpp"

namespace kvcache {
namespace {

using testing::write_bytes;
struct TempDir : testing::TempDir {
  TempDir() : testing::TempDir("kvcache_safetensors") {}
};

namespace fs = std::filesystem;
using testing::random_tensor;
using testing::to_doubles;

// A raw file: little-endian header length, the header text as given, then `data_size` bytes.
std::string raw_file(const std::string& header, std::size_t data_size,
                     std::uint64_t header_len = UINT64_MAX) {
  if (header_len == UINT64_MAX) header_len = header.size();
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i)
    bytes[static_cast<std::size_t>(i)] = static_cast<char>(header_len >> (8 * i));
  bytes += header;
  bytes.append(data_size, '\x11');
  return bytes;
}

std::vector<unsigned char> bytes_of(const Tensor& t) {
  const Tensor c = t.is_contiguous() ? t : cpu::clone(t);
  const auto* p = static_cast<const unsigned char*>(c.data());
  return std::vector<unsigned char>(p, p + c.nbytes());
}

TEST(Safetensors, RoundTripKeepsBytesShapesAndMetadata) {
  TempDir dir;
  std::mt19937 rng(1);
  const Tensor f32 = random_tensor({2, 3, 4}, DType::kFloat32, rng);
  const Tensor bf16 = random_tensor({5, 7}, DType::kBFloat16, rng);  // odd byte count: 70
  Tensor i64 = Tensor::empty({3}, DType::kInt64);
  const std::int64_t ids[3] = {-1, 0, 1LL << 40};
  std::memcpy(i64.data(), ids, sizeof ids);
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"note", "kvcache"}};
  const std::string path = dir.file("model.safetensors");
  save_safetensors(path, {{"a.bf16", bf16}, {"b.f32", f32}, {"c.i64", i64}}, metadata);

  const SafetensorsFile file = SafetensorsFile::open(path);
  EXPECT_EQ(file.path(), path);
  EXPECT_EQ(file.metadata(), metadata);
  ASSERT_EQ(file.entries().size(), 3u);
  EXPECT_EQ(file.entries()[0].name, "a.bf16");  // header order is the caller's order
  EXPECT_EQ(file.entries()[0].dtype_name, "BF16");
  EXPECT_EQ(file.entries()[1].dtype_name, "F32");
  EXPECT_EQ(file.entries()[2].dtype_name, "I64");
  EXPECT_EQ(file.entries()[0].shape, (std::vector<std::int64_t>{5, 7}));
  EXPECT_TRUE(file.contains("c.i64"));
  EXPECT_FALSE(file.contains("d"));

  for (const auto& [name, original] : std::vector<std::pair<std::string, Tensor>>{
           {"a.bf16", bf16}, {"b.f32", f32}, {"c.i64", i64}}) {
    const Tensor t = file.tensor(name);
    EXPECT_EQ(t.dtype(), original.dtype()) << name;
    EXPECT_EQ(t.device(), Device::kCpu);
    ASSERT_EQ(t.shape_string(), original.shape_string()) << name;
    EXPECT_TRUE(t.is_contiguous());
    EXPECT_EQ(bytes_of(t), bytes_of(original)) << name;
    // save_safetensors places data so every tensor is aligned for its dtype.
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(t.data()) % t.element_size(), 0u) << name;
  }
}

TEST(Safetensors, SavesStridedTensorsInLogicalOrder) {
  TempDir dir;
  std::mt19937 rng(2);
  const Tensor base = random_tensor({3, 5}, DType::kFloat32, rng);
  const Tensor transposed = base.transpose(0, 1);  // [5, 3], not contiguous
  ASSERT_FALSE(transposed.is_contiguous());
  const std::string path = dir.file("t.safetensors");
  save_safetensors(path, {{"t", transposed}});
  const SafetensorsFile file = SafetensorsFile::open(path);
  const Tensor t = file.tensor("t");
  EXPECT_EQ(t.shape_string(), transposed.shape_string());
  EXPECT_EQ(to_doubles(t), to_doubles(transposed));
  EXPECT_TRUE(file.metadata().empty());
}

TEST(Safetensors, ViewsAreZeroCopyAndOutliveTheFile) {
  TempDir dir;
  std::mt19937 rng(3);
  const Tensor a = random_tensor({4, 8}, DType::kFloat32, rng);
  const Tensor b = random_tensor({16}, DType::kFloat32, rng);
  const std::string path = dir.file("m.safetensors");
  save_safetensors(path, {{"a", a}, {"b", b}});

  Tensor va, vb;
  {
    const SafetensorsFile file = SafetensorsFile::open(path);
    va = file.tensor("a");
    vb = file.tensor("b");
    // Same pointer on every call, and the two views sit exactly as far apart as the header's
    // offsets say: both point into one mapping, nothing was copied.
    EXPECT_EQ(file.tensor("a").data(), va.data());
    const auto* ea = file.find("a");
    const auto* eb = file.find("b");
    ASSERT_NE(ea, nullptr);
    ASSERT_NE(eb, nullptr);
    EXPECT_EQ(static_cast<const std::byte*>(vb.data()) - static_cast<const std::byte*>(va.data()),
              static_cast<std::ptrdiff_t>(eb->begin) - static_cast<std::ptrdiff_t>(ea->begin));
    EXPECT_TRUE(va.owns_storage());
  }
  // The file object is gone and the file itself is unlinked; the mapping lives in the views.
  fs::remove(path);
  EXPECT_EQ(to_doubles(va), to_doubles(a));
  EXPECT_EQ(to_doubles(vb), to_doubles(b));
  const Tensor sliced = va.slice(0, 1, 3);  // views of views keep it alive too
  va = Tensor();
  vb = Tensor();
  EXPECT_EQ(to_doubles(sliced), to_doubles(a.slice(0, 1, 3)));
}

TEST(Safetensors, OtherDTypesAreListedButNotHandedOut) {
  TempDir dir;
  // BOOL maps to uint8; F64 is validated and listed with no DType; rank 0 and rank 5 shapes.
  const std::string header = R"({"flag":{"dtype":"BOOL","shape":[3],"data_offsets":[0,3]},)"
                             R"("d":{"dtype":"F64","shape":[2],"data_offsets":[8,24]},)"
                             R"("s":{"dtype":"F32","shape":[],"data_offsets":[24,28]},)"
                             R"("r5":{"dtype":"U8","shape":[1,1,1,1,2],"data_offsets":[28,30]},)"
                             R"("e":{"dtype":"F16","shape":[0,4],"data_offsets":[30,30]}})";
  const std::string path = dir.file("x.safetensors");
  write_bytes(path, raw_file(header, 30));
  const SafetensorsFile file = SafetensorsFile::open(path);
  ASSERT_EQ(file.entries().size(), 5u);
  EXPECT_EQ(file.tensor("flag").dtype(), DType::kUInt8);
  EXPECT_EQ(file.find("d")->dtype, std::nullopt);
  EXPECT_EQ(file.find("d")->dtype_name, "F64");
  EXPECT_KVCACHE_ERROR(file.tensor("d"), "dtype F64");
  EXPECT_EQ(file.tensor("s").rank(), 0);
  EXPECT_EQ(file.tensor("s").numel(), 1);
  EXPECT_KVCACHE_ERROR(file.tensor("r5"), "rank 5");
  EXPECT_EQ(file.tensor("e").numel(), 0);
}

TEST(Safetensors, MisalignedDataIsReadable) {
  TempDir dir;
  // One byte of U8 pushes the F32 tensor to an odd address; the view is still correct when read
  // through memcpy, which is how kvcache's CPU code reads weights.
  const std::string header = R"({"pad":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                             R"("w":{"dtype":"F32","shape":[2],"data_offsets":[1,9]}})";
  std::string bytes = raw_file(header, 0);
  const float values[2] = {1.5f, -2.25f};
  bytes.push_back('\x7');
  bytes.append(reinterpret_cast<const char*>(values), sizeof values);
  const std::string path = dir.file("mis.safetensors");
  write_bytes(path, bytes);
  const Tensor w = SafetensorsFile::open(path).tensor("w");
  float read[2];
  std::memcpy(read, w.data(), sizeof read);
  EXPECT_EQ(read[0], 1.5f);
  EXPECT_EQ(read[1], -2.25f);
}

TEST(Safetensors, MissingTensorIsAnError) {
  TempDir dir;
  const std::string path = dir.file("m.safetensors");
  save_safetensors(path, {{"a", Tensor::zeros({2}, DType::kFloat32)}});
  const SafetensorsFile file = SafetensorsFile::open(path);
  EXPECT_EQ(file.find("nope"), nullptr);
  EXPECT_KVCACHE_ERROR(file.tensor("nope"), "no tensor 'nope'");
  EXPECT_KVCACHE_ERROR(file.tensor("nope"), path);
}

// Each broken file: the error names the file and says what was wrong.
struct BadFile {
  const char* label;
  std::string bytes;
  const char* needle;
};

TEST(Safetensors, BadFilesGiveClearErrors) {
  TempDir dir;
  const std::string ok_entry = R"("w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  const std::vector<BadFile> cases = {
      {"empty", "", "expected at least 8 bytes"},
      {"truncated", std::string("\x10\0\0", 3), "expected at least 8 bytes"},
      {"header_too_long", raw_file("{" + ok_entry + "}", 8, 1000), "header length 1000"},
      {"huge_header_len", raw_file("{}", 0, UINT64_MAX - 3), "runs past the end"},
      {"invalid_json", raw_file(R"({"w": {"dtype": )", 8), "not valid JSON"},
      {"not_object", raw_file("[1, 2]", 0), "expected the header to be a JSON object"},
      {"size_mismatch", raw_file(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8),
       "needs 12 bytes, but data_offsets span 8"},
      {"past_end", raw_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 8),
       "begin <= end <= 8"},
      {"reversed", raw_file(R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[4,2]}})", 8),
       "got [4, 2]"},
      {"overlap",
       raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                8),
       "overlap"},
      {"unknown_dtype", raw_file(R"({"w":{"dtype":"F128","shape":[2],"data_offsets":[0,8]}})", 8),
       "unknown dtype 'F128'"},
      {"negative_shape", raw_file(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8),
       "non-negative integer sizes"},
      {"float_shape", raw_file(R"({"w":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", 8),
       "non-negative integer sizes"},
      {"overflowing_shape",
       raw_file(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8),
       "more bytes than a file can hold"},
      {"missing_offsets", raw_file(R"({"w":{"dtype":"F32","shape":[2]}})", 8), "data_offsets"},
      {"missing_dtype", raw_file(R"({"w":{"shape":[2],"data_offsets":[0,8]}})", 8), "\"dtype\""},
      {"entry_not_object", raw_file(R"({"w":3})", 0), "tensor 'w'"},
      {"bad_metadata", raw_file(R"({"__metadata__":{"k":1},)" + ok_entry + "}", 8),
       "\"__metadata__\" value 'k'"},
  };
  for (const BadFile& c : cases) {
    SCOPED_TRACE(c.label);
    const std::string path = dir.file(std::string(c.label) + ".safetensors");
    write_bytes(path, c.bytes);
    EXPECT_KVCACHE_ERROR(SafetensorsFile::open(path), c.needle);
    EXPECT_KVCACHE_ERROR(SafetensorsFile::open(path), path);
  }
  EXPECT_KVCACHE_ERROR(SafetensorsFile::open(dir.file("absent.safetensors")), "cannot open");
  EXPECT_KVCACHE_ERROR(SafetensorsFile::open(dir.str()), "expected a regular file");
}

// Opens `path` and reads every tensor it hands out; anything but success or kvcache::Error fails.
void open_and_touch(const std::string& path) {
  try {
    const SafetensorsFile file = SafetensorsFile::open(path);
    for (const auto& entry : file.entries()) {
      if (!entry.dtype || entry.shape.size() > static_cast<std::size_t>(kMaxRank)) continue;
      const Tensor t = file.tensor(entry.name);
      std::vector<unsigned char> copy(t.nbytes());
      if (!copy.empty()) std::memcpy(copy.data(), t.data(), copy.size());  // must stay in bounds
    }
  } catch (const Error&) {
  }
}

TEST(Safetensors, TruncatedAndCorruptedFilesNeverCrash) {
  TempDir dir;
  std::mt19937 rng(5);
  const std::string good = dir.file("good.safetensors");
  save_safetensors(good,
                   {{"a", random_tensor({3, 5}, DType::kFloat32, rng)},
                    {"b", random_tensor({7}, DType::kBFloat16, rng)}},
                   {{"format", "pt"}});
  std::ifstream in(good, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_GT(bytes.size(), 8u);
  const std::string path = dir.file("bad.safetensors");
  for (std::size_t len = 0; len < bytes.size(); ++len) {  // every truncation
    write_bytes(path, bytes.substr(0, len));
    EXPECT_KVCACHE_ERROR(SafetensorsFile::open(path), path);
  }
  // Random byte changes in the length and the header (the data section cannot make a file bad).
  std::uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i)
    header_len = (header_len << 8) | static_cast<unsigned char>(bytes[static_cast<std::size_t>(i)]);
  std::uniform_int_distribution<std::size_t> position(0, 8 + header_len - 1);
  std::uniform_int_distribution<int> value(0, 255);
  for (int trial = 0; trial < 300; ++trial) {
    std::string corrupt = bytes;
    for (int k = 0; k < 1 + trial % 3; ++k) corrupt[position(rng)] = static_cast<char>(value(rng));
    write_bytes(path, corrupt);
    open_and_touch(path);
  }
}

// A checkpoint folder with two shards and an index, as transformers' save_pretrained writes it.
class SafetensorsSharded : public ::testing::Test {
 protected:
  void SetUp() override {
    std::mt19937 rng(4);
    embed_ = random_tensor({10, 4}, DType::kBFloat16, rng);
    q_ = random_tensor({4, 4}, DType::kBFloat16, rng);
    norm_ = random_tensor({4}, DType::kFloat32, rng);
    save_safetensors(dir_.file("model-00001-of-00002.safetensors"),
                     {{"model.embed_tokens.weight", embed_}, {"model.layers.0.q_proj.weight", q_}});
    save_safetensors(dir_.file("model-00002-of-00002.safetensors"), {{"model.norm.weight", norm_}});
  }
  void write_index(const std::string& weight_map) {
    write_bytes(dir_.file("model.safetensors.index.json"),
                R"({"metadata": {"total_size": 132}, "weight_map": )" + weight_map + "}");
  }
  static std::string full_map() {
    return R"({"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
               "model.layers.0.q_proj.weight": "model-00001-of-00002.safetensors",
               "model.norm.weight": "model-00002-of-00002.safetensors"})";
  }

  TempDir dir_;
  Tensor embed_, q_, norm_;
};

TEST_F(SafetensorsSharded, OpensEveryShardOnceAndFindsEachTensor) {
  write_index(full_map());
  const SafetensorsCheckpoint ckpt = SafetensorsCheckpoint::open(dir_.str());
  EXPECT_EQ(ckpt.files().size(), 2u);
  EXPECT_EQ(ckpt.names(),
            (std::vector<std::string>{"model.embed_tokens.weight", "model.layers.0.q_proj.weight",
                                      "model.norm.weight"}));
  EXPECT_TRUE(ckpt.contains("model.norm.weight"));
  EXPECT_FALSE(ckpt.contains("lm_head.weight"));
  EXPECT_EQ(to_doubles(ckpt.tensor("model.embed_tokens.weight")), to_doubles(embed_));
  EXPECT_EQ(to_doubles(ckpt.tensor("model.layers.0.q_proj.weight")), to_doubles(q_));
  EXPECT_EQ(to_doubles(ckpt.tensor("model.norm.weight")), to_doubles(norm_));
  EXPECT_KVCACHE_ERROR(ckpt.tensor("lm_head.weight"), "no tensor 'lm_head.weight'");
  EXPECT_KVCACHE_ERROR(ckpt.tensor("lm_head.weight"), dir_.str());
}

TEST_F(SafetensorsSharded, IndexNamingAMissingShardIsAnError) {
  write_index(R"({"model.norm.weight": "model-00003-of-00002.safetensors"})");
  EXPECT_KVCACHE_ERROR(SafetensorsCheckpoint::open(dir_.str()),
                       "names shard 'model-00003-of-00002.safetensors'");
}

TEST_F(SafetensorsSharded, IndexNamingATensorNotInItsShardIsAnError) {
  write_index(R"({"model.norm.weight": "model-00001-of-00002.safetensors"})");
  EXPECT_KVCACHE_ERROR(SafetensorsCheckpoint::open(dir_.str()),
                       "tensor 'model.norm.weight' is listed in shard "
                       "'model-00001-of-00002.safetensors', which does not hold it");
}

TEST_F(SafetensorsSharded, IndexShardNamesMustBePlainFileNames) {
  write_index(R"({"model.norm.weight": "../model-00002-of-00002.safetensors"})");
  EXPECT_KVCACHE_ERROR(SafetensorsCheckpoint::open(dir_.str()), "plain shard file name");
  write_index(R"({"model.norm.weight": "sub/x.safetensors"})");
  EXPECT_KVCACHE_ERROR(SafetensorsCheckpoint::open(dir_.str()), "plain shard file name");
}

TEST_F(SafetensorsSharded, MalformedIndexIsAnError) {
  write_index("[1, 2");
  EXPECT_KVCACHE_ERROR(SafetensorsCheckpoint::open(dir_.str()), "not valid JSON");
  write_index("[]");
  EXPECT_KVCACHE_ERROR(SafetensorsCheckpoint::open(dir_.str()), "\"weight_map\"");
  write_index(R"({"model.norm.weight": 3})");
  EXPECT_KVCACHE_ERROR(SafetensorsCheckpoint::open(dir_.str()), "expected a shard file name");
}

TEST(SafetensorsCheckpoint, SingleFileAndEmptyFolder) {
  TempDir dir;
  EXPECT_KVCACHE_ERROR(
      SafetensorsCheckpoint::open(dir.str()),
      "expected model.safetensors or model.safetensors.index.json in " + dir.str());
  const Tensor w = Tensor::zeros({3, 2}, DType::kFloat16);
  save_safetensors(dir.file("model.safetensors"), {{"w", w}, {"b", w.slice(0, 0, 1)}});
  const SafetensorsCheckpoint ckpt = SafetensorsCheckpoint::open(dir.str());
  EXPECT_EQ(ckpt.files().size(), 1u);
  EXPECT_EQ(ckpt.names(), (std::vector<std::string>{"b", "w"}));
  EXPECT_EQ(ckpt.tensor("w").shape_string(), w.shape_string());
}

TEST(Safetensors, SaveRejectsBadInput) {
  TempDir dir;
  const Tensor w = Tensor::zeros({2}, DType::kFloat32);
  EXPECT_KVCACHE_ERROR(save_safetensors(dir.file("a"), {{"w", w}, {"w", w}}), "appears twice");
  EXPECT_KVCACHE_ERROR(save_safetensors(dir.file("b"), {{"__metadata__", w}}), "reserved");
  EXPECT_KVCACHE_ERROR(save_safetensors(dir.file("c"), {{"u", Tensor()}}), "undefined");
  EXPECT_KVCACHE_ERROR(save_safetensors(dir.file("no/such/dir/d"), {{"w", w}}), "cannot create");
}

}  // namespace
}  // namespace kvcache
