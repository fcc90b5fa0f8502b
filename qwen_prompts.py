"""Prompt text for every task: one block per task. Edit this file by hand to change prompts.

A block holds only text; rewards, success rules, data files and opening turns are in the
task registry (tasks.py). Each block has:
  system_role, user_role  speaker names in transcripts
  actions                 ordered {action name: instruction given to the system LLM}
  planner                 what the planner is told about the task: roles and goal
  system, user            each self-play role's description (formatted with the case)
  critic                  the critic's description of what it judges (formatted with the case)
  critic_question         the closed question the critic answers (formatted with the case)
  verdicts                the critic's options, in order; tasks.py gives each a reward
cb also has price_question: asked once, greedily, in `--critic logits` mode after a deal.

Placeholders in braces are filled from the case (see tasks.py, `case_fields`). The wording
is this project's own; the meaning of each role's instructions follows the original
DialogXpert release (README, "Tasks": the differences found are listed there).
"""

ESC = {
    "system_role": "Therapist",
    "user_role": "Patient",
    "actions": {
        "Question": "Ask the Patient to tell more about the situation they described.",
        "Self-disclosure": "Say something about yourself that relates to the Patient's situation.",
        "Affirmation and Reassurance": "Affirm and reassure the Patient about their situation.",
        "Providing Suggestions": "Suggest to the Patient what they could do about their situation.",
        "Others": "Chat with the Patient.",
        "Reflection of feelings": "Acknowledge the Patient's feelings about their situation.",
        "Information": "Give the Patient factual information that helps with their situation.",
        "Restatement or Paraphrasing": "Acknowledge the Patient's feelings by restating their "
                                       "situation in your own words.",
    },
    "planner": "You plan the next step of an emotional support conversation between a "
               "Therapist and a Patient, using the conversation and the Patient's emotions so "
               "far. The Therapist's goal is that the Patient feels understood and supported "
               "and makes progress towards resolving their emotional problem.",
    "system": "You are role-playing a Therapist in a counselling conversation with a Patient. "
              "Your goal is to help the Patient resolve their emotional problem and to help "
              "them understand and work through it.",
    "user": "You are role-playing a Patient in a counselling conversation with a Therapist. "
            "You came for help because of emotional problems: {emotion_type} about "
            "{problem_type}. Reply in one short sentence that says, naturally and with "
            "emotion, how you feel.",
    "critic": "You judge counselling conversations between a Therapist and a Patient: did "
              "the conversation improve the Patient's emotional state? The session is about "
              "{emotion_type} and {problem_type}.",
    "critic_question": "Based on the conversation, has the Patient's problem been "
                       "solved?",
    "verdicts": [
        "No, the Patient feels worse.",
        "No, the Patient feels the same.",
        "No, but the Patient feels somewhat better.",
        "Yes, the Patient's emotional problem has been solved.",
    ],
}

# ExTES shares ESConv's roles, planner description, Therapist, critic question and options
EXTES = {
    **ESC,
    "actions": {
        "Reflective Statements": "Reflect back what the Patient has expressed, to show that "
                                 "you understand their thoughts and feelings.",
        "Clarification": "Ask the Patient to clarify what they meant or to give more detail.",
        "Emotional Validation": "Acknowledge and validate the Patient's emotions with care.",
        "Empathetic Statements": "Show empathy for the Patient's situation.",
        "Affirmation": "Affirm the Patient's efforts, strengths or good qualities.",
        "Offer Hope": "Offer hope or optimism about the Patient's situation.",
        "Avoid Judgment and Criticism": "Answer supportively and neutrally, without judging.",
        "Suggest Options": "Suggest options or actions the Patient could consider.",
        "Collaborative Planning": "Invite the Patient to make a plan or decision together.",
        "Provide Different Perspectives": "Help the Patient see the situation from another "
                                          "point of view.",
        "Reframe Negative Thoughts": "Help the Patient turn a negative thought into a more "
                                     "constructive one.",
        "Share Information": "Give factual, useful information relevant to the Patient's "
                             "situation.",
        "Normalize Experiences": "Reassure the Patient that their feelings and experiences are "
                                 "common and understandable.",
        "Promote Self-Care Practices": "Encourage the Patient to take care of themselves.",
        "Stress Management": "Offer strategies or tips that reduce or manage stress.",
        "Others": "Continue the conversation naturally and supportively.",
    },
    "user": "You are role-playing a Patient in a counselling conversation with a Therapist. "
            "You came for help with emotional problems related to {scene}. Reply in one "
            "short sentence that says, naturally and with emotion, how you feel.",
    "critic": "You judge counselling conversations between a Therapist and a Patient: did "
              "the conversation improve the Patient's emotional state? The session is about "
              "{scene}.",
}

CIMA = {
    "system_role": "Teacher",
    "user_role": "Student",
    "actions": {
        "Hint": "Give the Student a piece of knowledge as a hint.",
        "Question": "Ask the Student a question that checks their understanding or moves the "
                    "conversation on.",
        "Correction": "Correct the Student's mistake or misconception.",
        "Confirmation": "Confirm that the Student's answer or understanding is correct.",
        "Others": "Chat with the Student without any teaching strategy.",
    },
    "planner": "You plan the next step of a tutoring conversation between a Teacher and a "
               "Student, using the Student's progress, their emotions so far and the flow of "
               "the conversation. The goal is to lead the Student, quickly and effectively, to "
               "translate an English sentence correctly into Italian.",
    "system": "You are role-playing a Teacher in a tutoring conversation. Guide the Student "
              "to translate the English sentence \"{sentence}\" into Italian. Do not tell the "
              "Student the answer, and do not ask about other exercises. Make every reply "
              "helpful.",
    "user": "You are role-playing a Student learning Italian in a tutoring session. You do "
            "not know how to translate \"{sentence}\" into Italian and want to learn it by "
            "talking with the Teacher. Reply naturally in one short sentence; if you are "
            "confused, you may ask for clarification.",
    "critic": "You judge tutoring conversations between a Teacher and a Student: did the "
              "Student correctly translate the English sentence \"{sentence}\" into Italian?",
    "critic_question": "Did the Student correctly translate the whole sentence \"{sentence}\" "
                       "into Italian?",
    "verdicts": [
        "No, the Student made an incorrect translation.",
        "No, the Student did not try to translate.",
        "No, the Student only translated a part of the sentence correctly.",
        "Yes, the Student correctly translated the whole sentence.",
    ],
}

CB = {
    "system_role": "Buyer",
    "user_role": "Seller",
    # the dialogue acts of CraigslistBargain, with the names the original release uses
    "actions": {
        "greet": "Say hello or chat casually.",
        "inquire": "Ask a question about the item: its year, price, condition, use.",
        "inform": "Give information about the item: its year, condition, use.",
        "propose": "Propose a price or a price range for the item.",
        "counter": "Propose a new price or a new price range.",
        "counter-noprice": "Propose a vague price, comparing with the price on the table.",
        "confirm": "Ask a question to confirm a piece of information.",
        "affirm": "Answer yes to a question that asks for confirmation.",
        "deny": "Answer no to a question that asks for confirmation.",
        "agree": "Agree with the proposed price.",
        "disagree": "Disagree with the proposed price.",
    },
    "planner": "You plan the next step of a price negotiation between a Buyer and a Seller, "
               "using the Seller's emotions so far and the flow of the negotiation. The goal "
               "is the best outcome for the Buyer.",
    "system": "You are role-playing a skilled Buyer in a price negotiation. You want to buy "
              "the {item_name} at your target price of {buyer_price}. Item description: "
              "{buyer_item_description} Negotiate well: get the lowest price without losing "
              "the deal. Make every reply persuasive.",
    "user": "You are role-playing a persuasive Seller in a price negotiation. You want to "
            "sell the {item_name} at your price of {seller_price}. Item description: "
            "{seller_item_description} Reply in one short, persuasive sentence.",
    "critic": "You judge price negotiations between a Buyer and a Seller: have they reached "
              "a deal by the end of the conversation?",
    # the answer format names no price: a price of its own would be copied as the deal's
    "critic_question": "Have the Buyer and the Seller reached a deal at the end of the "
                       "conversation? If they have, write the agreed price after the option's "
                       "number, as a number only, in this format: {deal_label}, <price>",
    "verdicts": [
        "They have not reached a deal.",
        "They have reached a deal.",
    ],
    "price_question": "The Buyer and the Seller have reached a deal. At what price? Answer "
                      "with the price as a number only.",
}

P4G = {
    "system_role": "Persuader",
    "user_role": "Persuadee",
    # the persuader's dialogue acts and persuasion strategies of the original release
    "actions": {
        "Proposition of donation": "Suggest that the Persuadee donates to Save the Children.",
        "Proposition of amount to be donated": "Propose a small amount, such as $1 or $2, "
                                               "that the Persuadee could donate.",
        "Proposition of confirmation of donation": "Ask the Persuadee to confirm that they "
                                                   "are ready to donate.",
        "Proposition of more donation": "Suggest that the Persuadee could give a little more "
                                        "if they are willing.",
        "Experience affirmation": "Affirm the Persuadee's views or experiences, to build "
                                  "rapport and trust.",
        "Greeting": "Start or continue the conversation with a polite, friendly greeting.",
        "Ask for donation rejection purpose": "Ask why the Persuadee may hesitate or not want "
                                              "to donate.",
        "Thank": "Thank the Persuadee for their time, attention or willingness to donate.",
        "Logical appeal": "Explain with logical reasons why a donation to Save the Children "
                          "makes a real difference.",
        "Emotion appeal": "Appeal to the Persuadee's emotions by describing the hardship of "
                          "children in need.",
        "Credibility appeal": "Mention the credibility and reputation of Save the Children.",
        "Foot in the door": "Ask first for a very small commitment, to make later agreement "
                            "more likely.",
        "Self-modeling": "Say that you donated yourself, so that the Persuadee does the same.",
        "Donation information": "Give facts about how donations are used and how they help "
                                "children.",
        "Personal story": "Tell a short, moving story of a child whom the charity helped.",
        "Source-related inquiry": "Ask where the Persuadee usually learns about charities and "
                                  "donations.",
        "Task-related inquiry": "Ask about the Persuadee's experience with, or preferences "
                                "for, giving to charity.",
        "Personal-related inquiry": "Ask a personal question about the Persuadee's values or "
                                    "priorities.",
        "Neutral inquiry": "Ask a general question that keeps the conversation going.",
    },
    "planner": "You plan the next step of a persuasion conversation between a Persuader and "
               "a Persuadee, using the conversation and the Persuadee's emotions so far. The "
               "Persuader's goal is that the Persuadee donates to the charity Save the "
               "Children; choose steps that are persuasive and emotionally appropriate.",
    "system": "You are role-playing a Persuader. Your goal is to persuade the Persuadee to "
              "donate to the charity Save the Children. Save the Children has its "
              "headquarters in London and fights poverty around the world, above all in "
              "developing countries and war zones. Small donations such as $1 or $2 already "
              "help a lot. Make every reply persuasive, based on the Persuadee's emotional "
              "state.",
    "user": "You are role-playing a Persuadee in a persuasion conversation. A Persuader is "
            "trying to convince you to donate to the charity Save the Children. Reply in one "
            "short sentence.",
    "critic": "You judge persuasion conversations between a Persuader and a Persuadee: has "
              "the Persuader convinced the Persuadee to donate to the charity Save the "
              "Children?",
    "critic_question": "At the end of the conversation, has the Persuadee been convinced to "
                       "donate?",
    "verdicts": [
        "The Persuadee has explicitly refused.",
        "The Persuadee remains neutral about donating.",
        "The Persuadee has a positive attitude towards donating but hasn't decided yet.",
        "The Persuadee has decided to donate.",
    ],
}

# --- templates shared by every task -------------------------------------------------------

# The planner's question, ending in one of the PLANNER_QUESTIONS (by --prior): logits and
# sample read the number of one option; list (the original release's question for its
# "TOP 4", without its example answer "1,2,4,5", which a model copies) reads every number
# of one answer; project asks for a plan in the planner's own words, which env.Planner
# maps onto an action.
PLANNER_TEMPLATE = (
    "Conversation so far:\n{transcript}\n\n"
    "Emotions of the {user_role} so far: {emotions}\n\n"
    "Options for the {system_role}'s next step:\n{options}\n"
    "{question}"
)
PLANNER_QUESTIONS = {
    "one": "Which option is the most suitable next step? Answer with its number only.",
    "list": "Which {count} options are the most suitable next steps? Answer with their "
            "numbers only, the most suitable first, separated by commas.",
    "plan": "In a few words, what should the {system_role} do next? Describe the step in "
            "your own words or name one of the options.",
}

# Appended to the system LLM's last message: the chosen action's instruction (none for
# the 'none' baseline policy), and with --use_emotion the request to name the user's
# emotion first.
SYSTEM_TURN_WITH_EMOTION = (
    "First infer the {user_role}'s emotional state in one word, then reply as the "
    "{system_role} in one short sentence, in exactly this format:\n"
    "Emotion: <one word>\nResponse: <your reply>\n{instruction}"
)
SYSTEM_TURN = "Reply as the {system_role} in one short sentence. {instruction}"

# --user_personas: added to the user's task prompt (personas.py); {persona} is written to
# the user as "you"
USER_PERSONA = "The {user_role} you play has this personality: {persona}"

CRITIC_TEMPLATE = (
    "Conversation so far:\n{transcript}\n\n"
    "{question}\nOptions:\n{options}\n"
    "Answer with the number of exactly one option."
)
